"""Launching the decode kernels of ``decode.py`` with little host time: ``launch_decode`` finds a ``DecodePlan``
(everything about the launch that follows from the geometry of its inputs) in a cache keyed by that geometry, so a
repeated call with tensors of the same shapes, strides and dtypes only allocates its output and launches.

Per call a plan allocates ``out`` (and ``lse`` when asked: both leave the call, so they are always fresh) and takes
the split-KV partial states (and an LSE nobody reads) from ``scratch.SCRATCH`` (one buffer per device, stream and
thread: see its rule for streams, threads and CUDA graphs); it launches the compiled kernels that its
``_launch.LaunchPlan`` s found on an earlier call directly (one launcher-state and stream read for both, the
tensors as data pointers), and through the ``LaunchPlan`` s where that does not apply (the first call, a launch
hook, a pointer not 16-byte aligned, the fused combine).
"""
import torch

from flashserve.kernels import decode, pdl
from flashserve.kernels._dispatch import triton_interpret_enabled
from flashserve.kernels._launch import bounded_put, launch_context
from flashserve.kernels.counters import zeroed_counters
from flashserve.kernels.decode import (COMBINE_LAUNCHER, DECODE_LAUNCHER, launch_config, state_layout,
                                       uses_fused_combine)
from flashserve.kernels.scratch import SCRATCH

_MAX_PLANS = 1024
_PLANS: dict[tuple, "DecodePlan"] = {}
_PAGED_PLANS: dict[tuple, "DecodePlan"] = {}  # (paged_decode_plan's)


def launch_decode(q, k_cache, v_cache, seqlens_k, block_table, cache_batch_idx, alibi_slopes, softmax_scale,
                  softcap, window_left, window_right, capacity, num_splits, write_lse, cache_leftpad=None,
                  fused_combine=None, key_start=None):
    """Launch the decode kernel (and the split combine) on validated arguments; no checks (engines call this with
    metadata they validated once). q (B, Sq, H, D), or (B, H, D) for one query per sequence (then out is
    (B, H, D)). ``seqlens_k`` (B,) int32 are the KV lengths after any append (with ``cache_leftpad``, the end
    rows: keys are rows ``cache_leftpad[b] .. seqlens_k[b] - 1``); causal masking is ``window_right = 0``;
    ``capacity`` (tokens a sequence of the cache can hold) sets the split layout, so the launch depends on shapes
    only and is safe to capture in a CUDA graph. Index values are clamped or masked in the kernel (never an access
    outside the tensors). ``fused_combine`` (None: ``uses_fused_combine``) merges the splits inside the decode
    kernel instead of a second launch (where a program has at most ``FUSED_COMBINE_MAX_ROWS`` query rows; more
    take the second launch). ``key_start``: optional (1,) int32 on the device, the first key every
    sequence attends to (the keys before it are skipped; their positions still count for causality and ALiBi).
    Returns (out in q's dtype, lse (B, H, Sq) fp32 when ``write_lse``, else None)."""
    plan = decode_plan(q, k_cache, v_cache, seqlens_k, block_table, cache_batch_idx, alibi_slopes, softmax_scale,
                       softcap, window_left, window_right, capacity, num_splits, write_lse, cache_leftpad,
                       fused_combine, key_start)
    return plan(q, k_cache, v_cache, seqlens_k, block_table, cache_batch_idx, alibi_slopes, cache_leftpad, key_start)


def decode_plan(q, k_cache, v_cache, seqlens_k, block_table, cache_batch_idx, alibi_slopes, softmax_scale, softcap,
                window_left, window_right, capacity, num_splits, write_lse, cache_leftpad=None, fused_combine=None,
                key_start=None) -> "DecodePlan":
    """The ``DecodePlan`` of a ``launch_decode`` call with these arguments (cached by their geometry)."""
    device = q.device
    key = (q.shape, q.stride(), q.dtype, device, k_cache.shape, k_cache.stride(), k_cache.dtype, v_cache.stride(),
           v_cache.dtype, seqlens_k.dtype, None if block_table is None else (block_table.stride(), block_table.dtype),
           None if cache_batch_idx is None else cache_batch_idx.dtype,
           None if alibi_slopes is None else (alibi_slopes.shape, alibi_slopes.stride(), alibi_slopes.dtype),
           None if cache_leftpad is None else cache_leftpad.dtype, None if key_start is None else key_start.dtype,
           softmax_scale, softcap, window_left, window_right, capacity, num_splits, write_lse, fused_combine,
           decode.FUSED_COMBINE_MAX_GROUPS, pdl.generation)  # (with the device: pdl.enabled(device), see pdl)
    plan = _PLANS.get(key)
    if plan is None:
        plan = bounded_put(_PLANS, key, DecodePlan(
            q, k_cache, v_cache, block_table, cache_batch_idx, alibi_slopes, cache_leftpad, key_start, softmax_scale,
            softcap, window_left, window_right, capacity, num_splits, write_lse, fused_combine), _MAX_PLANS)
    return plan


def paged_decode_plan(q, k_cache, v_cache, seqused_k, block_table, softmax_scale, window_left) -> "DecodePlan":
    """The ``decode_plan`` of ``paged_attention.decode``'s launch (causal, the capacity the block table's, no other
    optional input, no LSE), cached under a key of its own that needs fewer reads of the tensors than
    ``decode_plan``'s (the table's shape for the capacity)."""
    key = (q.shape, q.stride(), q.dtype, q.device, k_cache.shape, k_cache.stride(), k_cache.dtype, v_cache.stride(),
           v_cache.dtype, seqused_k.dtype, block_table.shape, block_table.stride(), block_table.dtype, softmax_scale,
           window_left, decode.FUSED_COMBINE_MAX_GROUPS, pdl.generation)
    plan = _PAGED_PLANS.get(key)
    if plan is None:
        plan = bounded_put(_PAGED_PLANS, key, decode_plan(
            q, k_cache, v_cache, seqused_k, block_table, None, None, softmax_scale, 0.0, window_left, 0,
            block_table.shape[1] * k_cache.shape[1], 0, False), _MAX_PLANS)
    return plan


class DecodePlan:
    """One decode launch (and its combine) for inputs of one geometry: ``plan(q, k_cache, v_cache, seqlens_k,
    block_table, cache_batch_idx, alibi_slopes, cache_leftpad, key_start)`` -> (out, lse or None). Built from
    tensors of that geometry (their values are not read) and the scalar arguments of ``launch_decode``."""

    def __init__(self, q, k_cache, v_cache, block_table, cache_batch_idx, alibi_slopes, cache_leftpad, key_start,
                 softmax_scale, softcap, window_left, window_right, capacity, num_splits, write_lse, fused_combine):
        # out like q where q is contiguous (empty_like is the cheapest allocation), else a contiguous tensor
        self.out_like_q = q.is_contiguous()
        self.out_shape, self.dtype, self.device = tuple(q.shape), q.dtype, q.device
        if q.dim() == 3:  # one query per sequence
            q = q.unsqueeze(1)
        batch, seqlen_q, num_heads, head_dim = q.shape
        k_shape = k_cache.shape
        num_heads_k = k_shape[2]
        grid, splits, block_m, block_n, block_d, combine_grid, block_h, block_s, combine_warps = launch_config(
            batch, seqlen_q, num_heads, num_heads_k, head_dim, capacity, num_splits, q.device)
        num_states, out_strides, lse_strides = state_layout(batch, seqlen_q, num_heads, head_dim, splits)
        rows = seqlen_q * (num_heads // num_heads_k)
        if fused_combine is None:
            fused_combine = uses_fused_combine(splits, batch * grid[1], rows)
        self.fused_combine = fused_combine = fused_combine and splits > 1 and rows <= decode.FUSED_COMBINE_MAX_ROWS
        # (1, 1) without the fused combine: the constexprs then do not split variants
        merge_rows, merge_splits = decode.merge_tile(rows, block_m, block_s, block_d) if fused_combine else (1, 1)
        self.counters = batch * grid[1] if fused_combine else 0
        self.lse_shape = (batch, num_heads, seqlen_q) if write_lse else None
        # Scratch: partial outputs, then their LSEs (split layouts); then an LSE nobody reads (not write_lse and a
        # kernel that writes one: one split, or the fused combine).
        lse_numel = batch * num_heads * seqlen_q
        unread_lse = not write_lse and (splits == 1 or fused_combine)
        self.uses_scratch = splits > 1 or unread_lse
        self.scratch_numel = num_states * (head_dim + 1) + (lse_numel if unread_lse else 0)
        self.scratch_offsets = (0, num_states * head_dim, num_states * (head_dim + 1))
        self.splits = splits
        paged = block_table is not None
        # plain inputs (a block table or none, nothing else optional): the compiled launch's arguments need no tests
        self.plain_inputs = (cache_batch_idx is None and alibi_slopes is None and cache_leftpad is None
                             and key_start is None)
        upcast = q.dtype == torch.float32 or not q.is_cuda or triton_interpret_enabled()
        use_pdl = pdl.enabled(q.device)
        q_strides, k_strides, v_strides = q.stride(), k_cache.stride(), v_cache.stride()
        self._decode = DECODE_LAUNCHER.plan(grid, (
            capacity, k_shape[0], seqlen_q, num_heads_k, head_dim, splits,
            float(head_dim ** -0.5 if softmax_scale is None else softmax_scale), float(softcap),
            window_left, window_right,
            q_strides[0], q_strides[1], q_strides[2], k_strides[0], k_strides[1], k_strides[2],
            v_strides[0], v_strides[1], v_strides[2], *out_strides, *lse_strides,
            block_table.stride()[0] if paged else 0,
            alibi_slopes.stride()[0] if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0,
        ), dict(
            GROUP=num_heads // num_heads_k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            PAGE_SIZE=k_shape[1] if paged else 1, PAGED=paged, HAS_BATCH_IDX=cache_batch_idx is not None,
            HAS_LEFTPAD=cache_leftpad is not None, HAS_KEY_START=key_start is not None,
            HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, HAS_SOFTCAP=softcap > 0,
            HAS_ALIBI=alibi_slopes is not None, UPCAST=upcast, DOT_PRECISION="ieee" if upcast else "tf32",
            FUSED_COMBINE=fused_combine, BLOCK_S=block_s, MERGE_ROWS=merge_rows, MERGE_SPLITS=merge_splits,
            PDL=use_pdl,
        ), num_warps=4, num_stages=3, **pdl.launch_options(use_pdl))
        self._combine = None if splits == 1 or fused_combine else COMBINE_LAUNCHER.plan(
            combine_grid, (seqlen_q, splits), dict(NUM_HEADS=num_heads, HEAD_DIM=head_dim, WRITE_LSE=write_lse,
                                                   BLOCK_H=block_h, BLOCK_S=block_s, BLOCK_D=block_d, PDL=use_pdl),
            num_warps=combine_warps, **pdl.launch_options(use_pdl))
        # What _launch_compiled reads, in one tuple (one attribute load instead of a dozen: it runs every call)
        self._compiled_launch = (
            self._decode.launcher, None if self._combine is None else self._combine.launcher,
            self.device if self.uses_scratch else None, self.scratch_numel, self.scratch_offsets, splits == 1,
            self._decode.grid, self._decode.tail, None if self._combine is None else self._combine.grid,
            None if self._combine is None else self._combine.tail)
        # launcher state -> (compiled decode, compiled combine or None), as the LaunchPlans found them: one look-up
        # per call for both (see _launch_compiled)
        self._kernels: dict[tuple, tuple] = {}

    def __call__(self, q, k_cache, v_cache, seqlens_k, block_table, cache_batch_idx, alibi_slopes, cache_leftpad,
                 key_start):
        out = _empty_like(q) if self.out_like_q else self._new_out()
        lse = None if self.lse_shape is None else self._new_lse()
        if not self.counters and self._decode.found_compiled:  # (see _launch_compiled)
            lengths = seqlens_k.data_ptr()
            optional = None if self.plain_inputs else tuple(
                lengths if tensor is None else tensor.data_ptr()
                for tensor in (cache_batch_idx, alibi_slopes, cache_leftpad, key_start))
            if self._launch_compiled(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), lengths,
                                     lengths if block_table is None else block_table.data_ptr(), optional, out, lse):
                return out, lse
        self._launch_planned(q, k_cache, v_cache, seqlens_k, block_table, cache_batch_idx, alibi_slopes,
                             cache_leftpad, key_start, out, lse)
        return out, lse

    def plain(self, q, k_cache, v_cache, seqlens_k, block_table, pointers: tuple | None = None):
        """``self(q, k_cache, v_cache, seqlens_k, block_table, None, None, None, None)`` for a plan built without
        the other optional inputs, ``pointers`` being the data pointers of (k_cache, v_cache, seqlens_k, block_table
        or seqlens_k without one) where the caller has read them."""
        out = _empty_like(q) if self.out_like_q else self._new_out()
        lse = None if self.lse_shape is None else self._new_lse()
        if not self.counters and self._decode.found_compiled:  # (see _launch_compiled)
            if pointers is None:
                pointers = (k_cache.data_ptr(), v_cache.data_ptr(), seqlens_k.data_ptr(),
                            (seqlens_k if block_table is None else block_table).data_ptr())
            if self._launch_compiled(q.data_ptr(), *pointers, None, out, lse):
                return out, lse
        self._launch_planned(q, k_cache, v_cache, seqlens_k, block_table, None, None, None, None, out, lse)
        return out, lse

    def _new_out(self):
        """A fresh out (it leaves the call) where it is not shaped like q (``empty_like`` is the cheaper one)."""
        return torch.empty(self.out_shape, dtype=self.dtype, device=self.device)

    def _new_lse(self):
        """A fresh lse (it leaves the call)."""
        return torch.empty(self.lse_shape, dtype=torch.float32, device=self.device)

    def _launch_planned(self, q, k_cache, v_cache, seqlens_k, block_table, cache_batch_idx, alibi_slopes,
                        cache_leftpad, key_start, out, lse) -> None:
        """The launches through the ``LaunchPlan`` s (which find the compiled kernels ``_launch_compiled`` uses)."""
        part, part_lse, unread_lse = SCRATCH.views(self.device, self.scratch_numel, self.scratch_offsets) \
            if self.uses_scratch else (None, None, None)
        if self.splits == 1:
            target_out, target_lse = out, unread_lse if lse is None else lse
        else:
            target_out, target_lse = part, part_lse
        final_lse = lse if lse is not None else unread_lse if self.fused_combine else target_lse
        counters = zeroed_counters(self.device, "decode", self.counters) if self.counters else target_lse
        self._decode((q, k_cache, v_cache, target_out, target_lse,
                      seqlens_k if block_table is None else block_table,
                      seqlens_k if cache_batch_idx is None else cache_batch_idx, seqlens_k,
                      seqlens_k if alibi_slopes is None else alibi_slopes,
                      seqlens_k if cache_leftpad is None else cache_leftpad,
                      seqlens_k if key_start is None else key_start, counters, out, final_lse))
        if self._combine is not None:
            self._combine((out, part_lse if lse is None else lse, part))

    def _launch_compiled(self, q, k_cache, v_cache, lengths, table, optional, out, lse) -> bool:
        """The launches straight through the compiled kernels that earlier launches of this plan found
        (``LaunchPlan.compiled``, remembered in ``_kernels``) for the same launcher state while neither kernel has a
        pre-run hook, every pointer 16-byte aligned and no launch hook
        (one state and stream read for both kernels); the inputs are data pointers: ``table`` is ``lengths``
        without a block table, ``optional`` those of (cache_batch_idx, alibi_slopes, cache_leftpad, key_start)
        (``lengths`` for an absent one), None for a plan without them. Callers test first that the plan's
        decode ``LaunchPlan`` found a compiled kernel (never in Triton's interpreter: ``launch_context`` needs a GPU
        driver) and that it has no fused combine (its counters come from ``zeroed_counters``, on the planned path).
        False (nothing launched) where that does not hold: the caller takes ``_launch_planned``."""
        context = launch_context()
        if context is None:
            return False
        state, stream, enter_hook, exit_hook = context
        decode_launcher, combine_launcher, scratch_device, scratch_numel, scratch_offsets, one_split, grid, tail, \
            combine_grid, combine_tail = self._compiled_launch
        kernels = self._kernels.get(state)
        if kernels is None:
            kernels = self._found_kernels(state)
            if kernels is None:
                return False
        elif decode_launcher.kernel.pre_run_hooks or combine_launcher is not None and \
                combine_launcher.kernel.pre_run_hooks:  # (what LaunchPlan.compiled tests)
            return False
        decode_kernel, combine_kernel = kernels
        if scratch_device is not None:  # (the views stay referenced until the launches are queued: see SCRATCH.slices)
            views, (part, part_lse, unread_lse) = SCRATCH.slices(scratch_device, scratch_numel, scratch_offsets)
        else:
            part = part_lse = unread_lse = 0
        out_ptr = out.data_ptr()
        lse_ptr = unread_lse if lse is None else lse.data_ptr()
        if one_split:
            target_out = out_ptr
            target_lse = final_lse = lse_ptr
        else:
            target_out = part
            target_lse = part_lse
            final_lse = part_lse if lse is None else lse_ptr
        if optional is None:
            if (q | k_cache | v_cache | lengths | table | out_ptr | lse_ptr | part | part_lse) & 15:
                return False
            batch_idx = alibi = leftpad = key_start = lengths
        else:
            batch_idx, alibi, leftpad, key_start = optional
            if (q | k_cache | v_cache | lengths | table | out_ptr | lse_ptr | part | part_lse | batch_idx | alibi
                    | leftpad | key_start) & 15:
                return False
        decode_kernel.run(grid[0], grid[1], grid[2], stream, decode_kernel.function, decode_kernel.packed_metadata,
                          None, enter_hook, exit_hook, q, k_cache, v_cache, target_out, target_lse, table, batch_idx,
                          lengths, alibi, leftpad, key_start, target_lse, out_ptr, final_lse, *tail)
        if combine_kernel is not None:
            combine_kernel.run(combine_grid[0], combine_grid[1], combine_grid[2], stream, combine_kernel.function,
                               combine_kernel.packed_metadata, None, enter_hook, exit_hook, out_ptr,
                               part_lse if lse is None else lse_ptr, part, *combine_tail)
        return True

    def _found_kernels(self, state) -> tuple | None:
        """(compiled decode, compiled combine or None) that the ``LaunchPlan`` s found for ``state``, remembered for
        ``_launch_compiled``; None where one has none (or its kernel has a pre-run hook)."""
        decode_kernel = self._decode.compiled(state)
        combine_kernel = None if self._combine is None else self._combine.compiled(state)
        if decode_kernel is None or self._combine is not None and combine_kernel is None:
            return None
        return bounded_put(self._kernels, state, (decode_kernel, combine_kernel), _MAX_KERNEL_STATES)


_MAX_KERNEL_STATES = 8  # (LaunchPlan keeps as many)
_empty_like = torch.empty_like
