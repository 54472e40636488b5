"""The eager fast path of ``flash_attn_with_kvcache``: plain calls (a (B,) length tensor or an int, maybe a block
table; nothing appended, no rotary, leftpad, batch index, ALiBi, window or softcap) remembered after they passed
every argument check, so that a repeated call only re-reads what may have changed.

``PLAIN_CALLS`` maps the key ``flash_attn_with_kvcache`` builds for a plain call of a plain ``torch.Tensor`` q and a
length tensor or int (q's shape, strides, dtype and device, an int length's value, the scalar arguments,
``pdl.generation``) to a ``PlainCall``: the geometry (shape, strides, dtype, device) the other tensors had
when the checks passed, the cache capacity and the ``decode_launch.DecodePlan``. Per call a ``PlainCall`` recognises the
tensors of an earlier call (one set per KV cache: the layers of a model) by their ids while they live (weak references),
PyTorch's version counters (bumped by every in-place op, the metadata ones — ``resize_``, ``as_strided_``,
``transpose_``, ``set_`` — included) and their data pointers; any other tensor has its geometry compared with the
remembered one, and an inference tensor (no version counter) every call. The index tensors (``cache_seqlens``,
``block_table``) count as recognised only if their value check passed with them as they are and
``index_checks.KVCACHE_CHECKED`` has not been cleared since: the semantics of ``checked_indices`` (with its blind spot,
changes PyTorch does not see — here also ``tensor.data = other`` keeping the data pointer —, which the kernels' clamps
and masks keep inside the tensors). Anything else goes through the value checks (``index_checks.check_kvcache_values``,
memoised themselves), and a geometry that differs through the full checks of ``decode_checks``.
"""
import functools
import weakref

import torch

from flashserve.kernels._launch import bounded_put
from flashserve.kernels.index_checks import KVCACHE_CHECKED, capturing, check_kvcache_values
from flashserve.kernels.scratch import SCRATCH

_MAX_PLAIN_CALLS = 256
_MAX_KNOWN = 512  # KV caches each PlainCall recognises (the layers of the models a process runs)
PLAIN_CALLS: dict[tuple, "PlainCall"] = {}


def remember(key: tuple, k_cache, v_cache, cache_seqlens, block_table, capacity: int, plan) -> None:
    """Record a plain call whose arguments passed every check (the oldest entry makes room)."""
    bounded_put(PLAIN_CALLS, key, PlainCall(k_cache, v_cache, cache_seqlens, block_table, capacity, plan),
                _MAX_PLAIN_CALLS)


def _geometry(tensor):
    return None if tensor is None else (tensor.shape, tensor.stride(), tensor.dtype, tensor.device)


class PlainCall:
    """One plain call signature that passed every check: ``launch(q, k_cache, v_cache, cache_seqlens,
    block_table)`` -> (out, lse or None) for arguments of that signature, or None (nothing launched) when a tensor's
    geometry differs from the remembered one (the caller then runs the full checks). Raises the value checks'
    ValueError. (A method, not ``__call__``: calling an instance costs ~0.1 µs more.)"""

    def __init__(self, k_cache, v_cache, cache_seqlens, block_table, capacity: int, plan):
        lengths = cache_seqlens if type(cache_seqlens) is torch.Tensor else None
        # the geometry of (k_cache, v_cache, the length tensor, block_table) (None: an int length, no block table)
        self.geometry = tuple(map(_geometry, (k_cache, v_cache, lengths, block_table)))
        self.capacity, self.plan = capacity, plan
        self.batch, self.device = plan.out_shape[0], plan.device
        # Tensors recognised later by (id, version, data pointer), each set with weak references whose callbacks
        # forget it once one of its tensors has died (an id is only reused after its object died): the caches seen
        # (one (k_cache, v_cache) pair per layer of a model, by id(k_cache)), and the last index tensors (length
        # tensor, block table; the layers of a step share them) whose values passed their check, with
        # KVCACHE_CHECKED's generation.
        self.caches: dict[int, tuple] = {}
        self._cache_references: dict[int, tuple] = {}
        self.indices = None
        self._index_references = ()

    def launch(self, q, k_cache, v_cache, cache_seqlens, block_table):
        # (q's shape and device are the key's: the plan's batch and device)
        lengths = SCRATCH.constant(self.device, self.batch, cache_seqlens) if type(cache_seqlens) is int \
            else cache_seqlens
        table = lengths if block_table is None else block_table  # (the kernel's pointer without a block table)
        try:
            pointers = k_pointer, v_pointer, lengths_pointer, table_pointer = (
                k_cache.data_ptr(), v_cache.data_ptr(), lengths.data_ptr(), table.data_ptr())
        except AttributeError:  # not a tensor: the full checks name it
            return None
        k_id = id(k_cache)
        try:
            caches = (k_id, k_cache._version, k_pointer, id(v_cache), v_cache._version, v_pointer)
        except RuntimeError:  # an inference tensor (no version counter): verified every call
            caches = None
        if (caches is None or self.caches.get(k_id) != caches) and not self._verify_caches(k_cache, v_cache, caches):
            return None
        try:
            indices = (id(lengths), lengths._version, lengths_pointer, id(table), table._version, table_pointer,
                       KVCACHE_CHECKED.generation)
        except RuntimeError:
            indices = None
        if (indices is None or indices != self.indices) and not self._verify_indices(
                q, k_cache, cache_seqlens, block_table, lengths, table, indices):
            return None
        return self.plan.plain(q, k_cache, v_cache, lengths, block_table, pointers)

    def _verify_caches(self, k_cache, v_cache, caches) -> bool:
        """Compare the caches' geometry with the remembered one (False: another geometry); remember them."""
        for tensor, geometry in zip((k_cache, v_cache), self.geometry):
            if type(tensor) is not torch.Tensor or _geometry(tensor) != geometry:
                return False
        if caches is not None:
            if len(self.caches) >= _MAX_KNOWN:
                self.caches.clear()
                self._cache_references.clear()
            forget = functools.partial(self._forget_caches, caches[0])
            self._cache_references[caches[0]] = (weakref.ref(k_cache, forget), weakref.ref(v_cache, forget))
            self.caches[caches[0]] = caches
        return True

    def _verify_indices(self, q, k_cache, cache_seqlens, block_table, lengths, table, indices) -> bool:
        """Compare the index tensors' geometry with the remembered one (False: another geometry), then the value
        checks (memoised themselves); remember the tensors where they can be recognised later."""
        length_tensor = None if type(cache_seqlens) is int else cache_seqlens
        for tensor, geometry in zip((length_tensor, block_table), self.geometry[2:]):
            if tensor is not None and (type(tensor) is not torch.Tensor or _geometry(tensor) != geometry):
                return False
        check_kvcache_values(q.shape[0], cache_seqlens, 0, self.capacity, k_cache, block_table, None, None)
        if indices is not None and not capturing():  # (nothing was checked while capturing)
            self.indices = None
            self._index_references = (weakref.ref(lengths, self._forget_indices),
                                      weakref.ref(table, self._forget_indices))
            self.indices = indices
        return True

    def _forget_caches(self, key: int, _reference) -> None:
        self.caches.pop(key, None)
        self._cache_references.pop(key, None)

    def _forget_indices(self, _reference) -> None:
        self.indices = None
