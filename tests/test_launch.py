"""_launch.CachedLauncher on the CPU: its keys (finer than Triton's specialisation) and when it steps aside.

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
