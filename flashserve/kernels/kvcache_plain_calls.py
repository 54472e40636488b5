"""The eager fast path of ``flash_attn_with_kvcache``: plain calls (a (B,) length tensor or an int, maybe a block
table; nothing appended, no rotary, leftpad, batch index, ALiBi, window or softcap) remembered after they passed
every argument check, so that a repeated call only re-reads what may have changed.

``PLAIN_CALLS`` maps ``plain_call_key`` (q's shape, strides, dtype and device, an int length's value, the scalar
arguments) to a ``PlainCall``: the geometry (shape, strides, dtype, device) the other tensors had when the checks
passed, the cache capacity and the ``decode_launch.DecodePlan``. Per call a ``PlainCall`` recognises the tensors of
an earlier call (one set per KV cache: the layers of a model) by their ids while they live (weak references),
PyTorch's version counters (bumped by every in-place op, the metadata ones — ``resize_``, ``as_strided_``,
``transpose_``, ``set_`` — included) and their data pointers; any other tensor has its geometry compared with the
remembered one, and an inference tensor (no version counter) every call. The index tensors (``cache_seqlens``,
``block_table``) count as recognised only if their value check passed with them as they are and
``index_checks.KVCACHE_CHECKED`` has not been cleared since: the semantics of ``checked_indices`` (with its blind
spot, changes PyTorch does not see — here also ``tensor.data = other`` keeping the data pointer —, which the kernels'
clamps and masks keep inside the tensors). Anything else goes through the value checks
(``index_checks.check_kvcache_values``, memoised themselves), and a geometry that differs through the full checks
of ``decode_checks``.
"""
import weakref

import torch

from flashserve.kernels import decode, pdl
from flashserve.kernels.index_checks import KVCACHE_CHECKED, capturing, check_kvcache_values
from flashserve.kernels.scratch import SCRATCH

_MAX_PLAIN_CALLS = 256
_MAX_KNOWN = 512  # tensor sets each PlainCall recognises (the layers of the models a process runs)
PLAIN_CALLS: dict[tuple, "PlainCall"] = {}


def plain_call_key(q, cache_seqlens, block_table, softmax_scale, causal, num_splits, return_softmax_lse):
    """The key of a plain call in ``PLAIN_CALLS``; None unless q is a plain ``torch.Tensor`` and ``cache_seqlens``
    a tensor or an int (the other tensors' geometry is the ``PlainCall``'s to check)."""
    lengths_type = type(cache_seqlens)
    if type(q) is not torch.Tensor or lengths_type is not int and lengths_type is not torch.Tensor:
        return None
    device = q.device
    return (q.shape, q.stride(), q.dtype, device, cache_seqlens if lengths_type is int else None,
            block_table is None, type(softmax_scale), softmax_scale, bool(causal), num_splits,
            bool(return_softmax_lse), decode.FUSED_COMBINE_MAX_GROUPS, pdl.enabled(device))


def remember(key: tuple, k_cache, v_cache, cache_seqlens, block_table, capacity: int, plan) -> None:
    """Record a plain call whose arguments passed every check (the oldest entry makes room)."""
    if len(PLAIN_CALLS) >= _MAX_PLAIN_CALLS:
        PLAIN_CALLS.pop(next(iter(PLAIN_CALLS)))
    PLAIN_CALLS[key] = PlainCall(k_cache, v_cache, cache_seqlens, block_table, capacity, plan)


def _geometry(tensor):
    return None if tensor is None else (tensor.shape, tensor.stride(), tensor.dtype, tensor.device)


class PlainCall:
    """One plain call signature that passed every check: ``call(q, k_cache, v_cache, cache_seqlens, block_table)``
    -> (out, lse or None) for arguments of that signature, or None (nothing launched) when a tensor's geometry
    differs from the remembered one (the caller then runs the full checks). Raises the value checks' ValueError."""

    def __init__(self, k_cache, v_cache, cache_seqlens, block_table, capacity: int, plan):
        lengths = cache_seqlens if type(cache_seqlens) is torch.Tensor else None
        # the geometry of (k_cache, v_cache, the length tensor, block_table) (None: an int length, no block table)
        self.geometry = tuple(map(_geometry, (k_cache, v_cache, lengths, block_table)))
        self.capacity, self.plan = capacity, plan
        # The tensors of the last calls that passed here, by id(k_cache) (the layers of a model): their ids,
        # versions and data pointers and KVCACHE_CHECKED's generation (the ``seen`` of ``__call__``); and their
        # weak references, whose callbacks forget every call once one of the tensors has died (an id is only
        # reused after its object died).
        self.known: dict[int, tuple] = {}
        self._references: dict[int, tuple] = {}

    def __call__(self, q, k_cache, v_cache, cache_seqlens, block_table):
        lengths = SCRATCH.constant(q.device, q.shape[0], cache_seqlens) if type(cache_seqlens) is int \
            else cache_seqlens
        table = lengths if block_table is None else block_table  # (the kernel's pointer without a block table)
        try:
            pointers = (k_cache.data_ptr(), v_cache.data_ptr(), lengths.data_ptr(), table.data_ptr())
        except AttributeError:  # not a tensor: the full checks name it
            return None
        try:
            seen = (id(k_cache), k_cache._version, id(v_cache), v_cache._version, id(lengths), lengths._version,
                    id(table), table._version, pointers, KVCACHE_CHECKED.generation)
        except RuntimeError:  # an inference tensor (no version counter): verified every call
            seen = None
        if seen is None or self.known.get(seen[0]) != seen:
            if not self._verify(q, k_cache, v_cache, cache_seqlens, block_table, lengths, table, seen):
                return None
        return self.plan.plain(q, k_cache, v_cache, lengths, block_table, pointers)

    def _verify(self, q, k_cache, v_cache, cache_seqlens, block_table, lengths, table, seen) -> bool:
        """Compare the tensors' geometry with the remembered one (False: another geometry), then the value checks
        (memo of their own); remember the tensors where they can be recognised later."""
        length_tensor = None if type(cache_seqlens) is int else cache_seqlens
        for tensor, geometry in zip((k_cache, v_cache, length_tensor, block_table), self.geometry):
            if tensor is not None and (type(tensor) is not torch.Tensor or _geometry(tensor) != geometry):
                return False
        check_kvcache_values(q.shape[0], cache_seqlens, 0, self.capacity, k_cache, block_table, None, None)
        if seen is not None and not capturing():  # (nothing was checked while capturing)
            if len(self.known) >= _MAX_KNOWN:
                self._forget()
            self._references[seen[0]] = tuple(weakref.ref(tensor, self._forget)
                                              for tensor in (k_cache, v_cache, lengths, table))
            self.known[seen[0]] = seen
        return True

    def _forget(self, _reference=None) -> None:
        self.known.clear()
        self._references.clear()
