"""Per-geometry launch plans on the CPU: the eager fast paths reuse the argument checks and launch plan of a
geometry seen before but still check index values; ``_launch.LaunchPlan`` reuses a compiled kernel only for what
its key covers; ``scratch.StreamScratch`` hands out one buffer per stream. (Kernels run in Triton's interpreter.)"""
import threading

import pytest
import torch
from triton import knobs
from triton.runtime.jit import JITFunction

from flashserve.kernels import (_launch, decode, decode_launch, flash_attn_with_kvcache, kvcache_interface,
                                kvcache_plain_calls, merge, paged_attention, reference)
from flashserve.kernels.scratch import StreamScratch
from test_decode import Case, make_inputs
from test_launch import _kernel


def _decode_args(seed=0, **case):
    args = make_inputs(Case(seqlen_new=0, **case), seed=seed)
    return {name: value for name, value in args.items() if value is not None}


def _reference_out(args):
    return reference.flash_attn_with_kvcache(**args, upcast=False)[0]


def test_repeated_plain_call_skips_the_argument_checks_but_not_the_value_checks(monkeypatch):
    """A second plain call of the same geometry (fresh tensors) skips check_kvcache_args; out-of-range values in
    that geometry still raise ValueError naming block_table; another geometry or dtype is checked again."""
    checked = []
    check = kvcache_interface.check_kvcache_args
    monkeypatch.setattr(kvcache_interface, "check_kvcache_args", lambda *args: checked.append(1) or check(*args))
    kvcache_plain_calls.PLAIN_CALLS.clear()
    for seed in range(2):
        args = _decode_args(seed, num_splits=3)
        out = flash_attn_with_kvcache(**args)
        torch.testing.assert_close(out, _reference_out(args), atol=2e-3, rtol=2e-3)
    assert len(checked) == 1
    args = _decode_args(num_splits=3)
    capacity = args["block_table"].shape[1] * args["k_cache"].shape[1]
    with pytest.raises(ValueError, match="block_table is too short"):
        flash_attn_with_kvcache(**{**args, "cache_seqlens": args["cache_seqlens"] + capacity})
    table = args["block_table"].clone()
    table[0, 0] = args["k_cache"].shape[0]
    with pytest.raises(ValueError, match="block_table entries"):
        flash_attn_with_kvcache(**{**args, "block_table": table})
    assert len(checked) == 1
    with pytest.raises(ValueError, match="k_cache"):  # dtype is part of the geometry: the named checks run
        flash_attn_with_kvcache(**{**args, "q": args["q"].float()})
    strided = _decode_args(num_splits=3, strided=True)
    torch.testing.assert_close(flash_attn_with_kvcache(**strided), _reference_out(strided), atol=2e-3, rtol=2e-3)
    assert len(checked) == 3


def test_repeated_int_lengths_reuse_their_length_tensor():
    args = _decode_args(int_seqlens=True)
    capacity = args["block_table"].shape[1] * args["k_cache"].shape[1]
    for _ in range(2):
        torch.testing.assert_close(flash_attn_with_kvcache(**args), _reference_out(args), atol=2e-3, rtol=2e-3)
    with pytest.raises(ValueError, match="cache_seqlens"):
        flash_attn_with_kvcache(**{**args, "cache_seqlens": capacity + 1})


def test_outputs_never_share_memory_across_calls():
    """Split partial states live in scratch memory reused by the next call; outputs never do."""
    first_args, second_args = _decode_args(0, num_splits=3), _decode_args(1, num_splits=3)
    first = flash_attn_with_kvcache(**first_args, return_softmax_lse=True)
    saved = [t.clone() for t in first]
    flash_attn_with_kvcache(**second_args, return_softmax_lse=True)
    flash_attn_with_kvcache(**_decode_args(2, num_splits=5, cache_len=300, batch=3))  # the scratch buffer grows
    assert all(torch.equal(t, s) for t, s in zip(first, saved))


def test_engine_decode_and_merge_fast_paths_match_the_reference():
    args = _decode_args(num_splits=0, cache_len=300)
    q, k_cache, v_cache, seqlens, table = (args[n] for n in ("q", "k_cache", "v_cache", "cache_seqlens",
                                                            "block_table"))
    expected = _reference_out(args)[:, 0]
    for _ in range(2):
        out = paged_attention.decode(q[:, 0], k_cache, v_cache, seqlens, table, q.shape[-1] ** -0.5)
        assert out.shape == q[:, 0].shape
        torch.testing.assert_close(out, expected, atol=2e-3, rtol=2e-3)
    empty = paged_attention.decode(q[:0, 0], k_cache, v_cache, seqlens[:0], table[:0], 0.25)
    assert empty.shape == (0, *q.shape[2:])
    states = [torch.randn(5, 4, 16) for _ in range(3)]
    lses = [torch.randn(4, 5) for _ in range(3)]
    expected, expected_lse = torch.empty(5, 4, 16), torch.empty(4, 5)
    reference.merge_attn_states(expected, states[1], lses[1], states[2], lses[2], expected_lse)
    for _ in range(2):
        merge.merge_attn_states(states[0], states[1], lses[1], states[2], lses[2], lses[0])
        torch.testing.assert_close(states[0], expected)
        torch.testing.assert_close(lses[0], expected_lse)
    with pytest.raises(ValueError, match="suffix_lse"):  # a new geometry: checked
        merge.merge_attn_states(states[0], states[1], lses[1], states[2], lses[2].T.contiguous())


class _Compiled:
    function = packed_metadata = None

    def __init__(self):
        self.runs = []

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, grid_0, grid_1, grid_2, stream, function, metadata, launch_metadata, enter, exit, *args):
        self.runs.append(((grid_0, grid_1, grid_2), args))


class _Compiling:
    """A kernel whose Triton path (``kernel[grid](...)``) returns a new compiled kernel each time."""
    pre_run_hooks = []

    def __init__(self):
        self.slow_calls = 0

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.slow_calls += 1
            return _Compiled()
        return launch


@pytest.fixture
def fake_driver(monkeypatch):
    class Active:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return 0

    class Driver:
        active = Active()

    monkeypatch.setattr(_launch, "_triton_driver", lambda: Driver)


def test_launch_plans_reuse_a_compiled_kernel_only_for_what_they_cover(fake_driver, monkeypatch):
    launcher = _launch.CachedLauncher(JITFunction(_kernel, do_not_specialize=["n"]))
    if not launcher._enabled:
        pytest.skip("this Triton release takes its own launch path")
    kernel = launcher.kernel = _Compiling()
    plan = launcher.plan((4,), (100, 1, 0.5), dict(BLOCK=64, SCALE=1), num_warps=4)
    buffer, out = torch.zeros(64), torch.zeros(64)
    plan((buffer, out))
    compiled = next(iter(launcher._entries.values()))
    plan((buffer[32:], out))  # 128-byte offset: still aligned, same kernel
    assert kernel.slow_calls == 1
    [(grid, args)] = compiled.runs
    assert grid == (4, 1, 1) and args[2:] == (100, 1, 0.5, 64, 1)
    assert args[:2] == (buffer[32:].data_ptr(), out.data_ptr())  # the pointers, not the tensors
    plan((buffer[1:], out))  # misaligned: the launcher's generic key, a new variant
    assert kernel.slow_calls == 2
    monkeypatch.setattr(knobs.runtime, "debug", True)  # another knob state: another variant
    plan((buffer, out))
    assert kernel.slow_calls == 3
    kernel.pre_run_hooks = [lambda *args, **kwargs: None]  # a hook: Triton's own path every time
    plan((buffer, out))
    plan((buffer, out))
    assert kernel.slow_calls == 5


def test_stream_scratch_reuses_one_buffer_and_grows():
    scratch, cpu = StreamScratch(), torch.device("cpu")
    first = scratch.views(cpu, 10, (0, 4))
    assert scratch.views(cpu, 10, (0, 4)) is first
    assert first[1].data_ptr() == first[0].data_ptr() + 16 and first[0].numel() >= 10
    bigger = scratch.views(cpu, 100, (0, 50))
    assert bigger[0].numel() >= 100
    again = scratch.views(cpu, 10, (0, 4))  # rebuilt on the grown buffer
    assert again is not first and again[0].data_ptr() == bigger[0].data_ptr()
    other_thread = []
    thread = threading.Thread(target=lambda: other_thread.append(scratch.views(cpu, 10, (0, 4))))
    thread.start()
    thread.join()
    assert other_thread[0][0].data_ptr() != again[0].data_ptr()  # another thread: its own buffer


class _Recording:
    """A kernel whose Triton path (``kernel[grid](...)``) records its arguments and returns one ``_Compiled``."""
    pre_run_hooks = []

    def __init__(self):
        self.calls, self.compiled = [], _Compiled()

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.calls.append((args, meta))
            return self.compiled
        return launch


@pytest.fixture
def recorded_decode(fake_driver, monkeypatch):
    """decode_launch's launchers with their fast paths on (as on a GPU) over recording stand-ins of the kernels,
    and empty plan caches: {"decode": recording, "combine": recording}."""
    recordings = {}
    for name, label, kernel in (("DECODE_LAUNCHER", "decode", decode._decode_kernel),
                                ("COMBINE_LAUNCHER", "combine", decode._combine_splits_kernel)):
        launcher = _launch.CachedLauncher(JITFunction(getattr(kernel, "fn", kernel)))
        if not launcher._enabled:
            pytest.skip("this Triton release takes its own launch path")
        launcher.kernel = recordings[label] = _Recording()
        monkeypatch.setattr(decode_launch, name, launcher)
    monkeypatch.setattr(decode_launch, "_PLANS", {})
    monkeypatch.setattr(decode_launch, "_PAGED_PLANS", {})
    kvcache_plain_calls.PLAIN_CALLS.clear()
    yield recordings
    kvcache_plain_calls.PLAIN_CALLS.clear()


def _pointers(args: tuple, renamed: dict) -> tuple:
    """Triton-path arguments as the compiled launch passes them: tensors as data pointers (``renamed``: pointers of
    the first call's outputs -> the second call's)."""
    return tuple(renamed.get(a.data_ptr(), a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("case, splits, lse", [({}, 3, False), ({}, 3, True), ({}, 1, False), ({}, 1, True),
                                               (dict(int_seqlens=True), 2, False), (dict(page_size=None), 2, True),
                                               (dict(alibi="bh", page_size=None, leftpad=True), 2, False)])
def test_compiled_launches_pass_what_tritons_path_passes(recorded_decode, case, splits, lse):
    """A repeated call launches the compiled kernels the first call's Triton path returned, with the same
    arguments (the tensors' data pointers; fresh outputs), through the plain-call memo or the plan."""
    args = {**_decode_args(**case), "num_splits": splits, "return_softmax_lse": lse}
    first, second = ((*flash_attn_with_kvcache(**args),) if lse else (flash_attn_with_kvcache(**args),)
                     for _ in range(2))
    renamed = {one.data_ptr(): other.data_ptr() for one, other in zip(first, second)}
    for recording in recorded_decode.values():
        if splits == 1 and recording is recorded_decode["combine"]:
            assert not recording.calls
            continue
        [(call_args, meta)] = recording.calls
        [(grid, run_args)] = recording.compiled.runs
        constexprs = tuple(value for name, value in meta.items() if name not in ("num_warps", "num_stages",
                                                                                  "launch_pdl"))
        assert run_args == _pointers(call_args, renamed) + constexprs


@pytest.mark.parametrize("hooked", ["decode", "combine"])
def test_a_pre_run_hook_sends_remembered_compiled_launches_through_tritons_path(recorded_decode, hooked):
    """A pre-run hook added to either kernel after a plan remembered both compiled kernels: the next call
    launches that kernel through Triton's own path (which runs the hook)."""
    args = {**_decode_args(), "num_splits": 3}
    for _ in range(3):
        flash_attn_with_kvcache(**args)
    recording = recorded_decode[hooked]
    assert len(recording.calls) == 1 and len(recording.compiled.runs) == 2
    recording.pre_run_hooks = [lambda *args, **kwargs: None]
    flash_attn_with_kvcache(**args)
    assert len(recording.calls) == 2 and len(recording.compiled.runs) == 2


def test_engine_decode_launches_compiled_kernels_only_for_aligned_pointers(recorded_decode):
    args = _decode_args(cache_len=300)
    q, k_cache, v_cache, seqlens, table = (args[n] for n in ("q", "k_cache", "v_cache", "cache_seqlens",
                                                            "block_table"))
    first, second = (paged_attention.decode(q[:, 0], k_cache, v_cache, seqlens, table, 0.25) for _ in range(2))
    [(call_args, meta)] = recorded_decode["decode"].calls
    [(grid, run_args)] = recorded_decode["decode"].compiled.runs
    assert run_args[:len(call_args)] == _pointers(call_args, {first.data_ptr(): second.data_ptr()})
    shifted = torch.empty(q.numel() + 1, dtype=q.dtype)[1:].view(q.shape)  # 2-byte aligned: Triton's path
    shifted.copy_(q)
    paged_attention.decode(shifted[:, 0], k_cache, v_cache, seqlens, table, 0.25)
    assert len(recorded_decode["decode"].calls) == 2 and len(recorded_decode["decode"].compiled.runs) == 1


def test_layers_sharing_index_tensors_verify_them_once(monkeypatch):
    """Two layers (their own caches, one cache_seqlens and block_table): the value check runs once per new length
    tensor, not once per layer; a cache of another geometry is checked in full and refused."""
    from flashserve.kernels import index_checks
    index_checks.KVCACHE_CHECKED.clear()
    kvcache_plain_calls.PLAIN_CALLS.clear()
    runs = []
    check = index_checks._check_kvcache
    monkeypatch.setattr(index_checks, "_check_kvcache", lambda *args: runs.append(1) or check(*args))
    first = _decode_args()
    layers = [first, {**first, "k_cache": first["k_cache"].clone(), "v_cache": first["v_cache"].clone()}]
    shared = {name: first[name] for name in ("cache_seqlens", "block_table")}
    for step in range(2):
        for layer in layers:
            args = {**layer, **shared}
            torch.testing.assert_close(flash_attn_with_kvcache(**args), _reference_out(args), atol=2e-3, rtol=2e-3)
        assert len(runs) == step + 1
        shared["cache_seqlens"] = shared["cache_seqlens"].clone()
    short = {**layers[1], **shared, "k_cache": layers[1]["k_cache"][:, :8]}
    with pytest.raises(ValueError, match="v_cache"):
        flash_attn_with_kvcache(**short)
