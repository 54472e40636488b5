"""_launch on the CPU: CachedLauncher's keys (finer than Triton's specialisation) and when it steps aside; bounded_put.

The launches themselves need a GPU (tests/test_launch_gpu.py); here the key is built with a stand-in driver.
"""
import pytest
import torch
import triton.language as tl
from triton.runtime.jit import JITFunction

from flashserve.kernels import _launch, merge


def _kernel(x_ptr, out_ptr, n, stride, alpha, BLOCK: tl.constexpr, SCALE: tl.constexpr):  # only its signature
    pass


@pytest.fixture
def launcher(monkeypatch):
    class Active:
        def get_current_device(self):
            return 0

    class Driver:
        active = Active()

    monkeypatch.setattr(_launch, "_triton_driver", lambda: Driver)
    return _launch.CachedLauncher(JITFunction(_kernel, do_not_specialize=["n"]))


def _key(launcher, x, out, n=100, stride=1, alpha=0.5, constexprs=None, **options):
    return launcher._key((x, out, n, stride, alpha), constexprs or dict(BLOCK=64, SCALE=1), options or
                         dict(num_warps=4))


def test_keys_follow_every_property_triton_specialises_on(launcher):
    buffer = torch.zeros(64)
    x, out = buffer[:32], torch.zeros(32)
    if not launcher._enabled:
        pytest.skip("this Triton release takes its own launch path")
    base = _key(launcher, x, out)
    assert base is not None and base == _key(launcher, x, out, n=117)  # n is not specialised: one variant
    different = [_key(launcher, buffer[1:33], out), _key(launcher, x.half(), out), _key(launcher, x, out, n=1),
                 _key(launcher, x, out, n=96), _key(launcher, x, out, n=2 ** 40), _key(launcher, x, out, stride=16),
                 _key(launcher, x, out, stride=2), _key(launcher, x, out, constexprs=dict(BLOCK=64, SCALE=2)),
                 _key(launcher, x, out, num_warps=8)]
    assert len({base, *different}) == len(different) + 1


def test_keys_step_aside_for_what_they_do_not_cover(launcher):
    x, out = torch.zeros(8), torch.zeros(8)
    if not launcher._enabled:
        pytest.skip("this Triton release takes its own launch path")
    assert launcher._key((x, out, 1, 1, 0.5), dict(SCALE=1, BLOCK=64), {}) is None  # constexprs out of order
    assert launcher._key((x, out, 1, 1), dict(BLOCK=64, SCALE=1), {}) is None  # an argument missing
    assert launcher._key((x, [out], 1, 1, 0.5), dict(BLOCK=64, SCALE=1), {}) is None  # an unknown type
    launcher.kernel.pre_run_hooks.append(lambda *args, **kwargs: None)
    assert launcher._key((x, out, 1, 1, 0.5), dict(BLOCK=64, SCALE=1), {}) is None


def test_interpreted_kernels_take_tritons_own_path():
    if merge.use_triton(torch.empty(0)) and not torch.cuda.is_available():
        assert not merge.MERGE_LAUNCHER._enabled  # TRITON_INTERPRET=1: an InterpretedFunction


class _Recording:
    pre_run_hooks = ()

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **meta: self.calls.append((args, meta))


def test_library_call_sites_are_covered_by_the_key(launcher, monkeypatch):
    """The decode, combine and merge call sites pass what the fast path covers (constexprs in signature order,
    argument types it knows): on a GPU their repeated launches skip Triton's binding."""
    if not launcher._enabled:
        pytest.skip("this Triton release takes its own launch path")
    from flashserve.kernels import decode, paged_attention
    launchers = {"decode": decode.DECODE_LAUNCHER, "combine": decode.COMBINE_LAUNCHER, "merge": merge.MERGE_LAUNCHER}
    recordings = {name: _Recording() for name in launchers}
    python_functions = {name: library_launcher.kernel.fn for name, library_launcher in launchers.items()}
    for name, library_launcher in launchers.items():
        monkeypatch.setattr(library_launcher, "kernel", recordings[name])
        monkeypatch.setattr(library_launcher, "_enabled", False)
    for module in (paged_attention, merge):
        monkeypatch.setattr(module, "use_triton", lambda tensor: True)
    table = torch.arange(4, dtype=torch.int32).view(2, 2)
    for splits_forced in (False, True):
        monkeypatch.setattr(decode, "FUSED_COMBINE_MAX_GROUPS", 0 if splits_forced else 64)
        paged_attention.decode(torch.zeros(2, 4, 16), torch.zeros(4, 256, 2, 16), torch.zeros(4, 256, 2, 16),
                               torch.tensor([300, 5], dtype=torch.int32), table, 0.25)
    merge.merge_attn_states(*(torch.zeros(3, 4, 16) for _ in range(2)), torch.zeros(4, 3), torch.zeros(3, 4, 16),
                            torch.zeros(4, 3))
    for name in launchers:
        assert recordings[name].calls, name
        fresh = _launch.CachedLauncher(JITFunction(python_functions[name]))
        for args, meta in recordings[name].calls:
            options = {key: meta.pop(key) for key in ("num_warps", "num_stages") if key in meta}
            assert fresh._key(args, meta, options) is not None, name


def test_fingerprints_of_every_covered_type():
    fingerprint = _launch._fingerprint_function((torch.Tensor, int, int, float, bool, type(None)),
                                                (False, False, True, False, False, False))
    x = torch.zeros(4, dtype=torch.float16)
    residue = x[1:].data_ptr() & 127
    assert fingerprint(x[1:], 7, 32, 0.5, True, None) == (torch.float16, residue, 7, False, True, True, False, True)
    assert _launch._fingerprint_function((float, type(None)), (False, False))(1.0, None) == ()
    assert _launch._fingerprint_function((torch.Tensor, list), (False, False)) is None


def test_bounded_put_keeps_at_most_max_entries_dropping_the_oldest_first():
    cache = {}
    for key in "abc":
        assert _launch.bounded_put(cache, key, key.upper(), 3) == key.upper()
    assert cache.get("a") == "A"  # a hit does not refresh "a": it is still the oldest
    assert _launch.bounded_put(cache, "d", "D", 3) == "D"
    assert list(cache.items()) == [("b", "B"), ("c", "C"), ("d", "D")]
    _launch.bounded_put(cache, "c", "C2", 3)  # a key already there: the oldest goes all the same, "c" keeps its place
    assert list(cache.items()) == [("c", "C2"), ("d", "D")]
    assert _launch.bounded_put(cache, None, "uncached", 3) == "uncached"  # None: not cacheable
    assert list(cache) == ["c", "d"] and cache.get(None) is None
