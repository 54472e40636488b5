"""Host-side launch arithmetic in plain Python: ``triton.next_power_of_2`` and ``triton.cdiv`` are constexpr
functions that cost microseconds per call from Python, which adds up on launch-bound decode steps; the upload of
small host lists; the bounded memos of launch plans (``bounded_put``); and the launchers that skip Triton's per-call
argument binding (``CachedLauncher``, and ``LaunchPlan`` for launches whose every non-tensor argument is fixed)."""
import functools
import operator
import os

import torch
from triton import knobs
from triton.runtime import driver


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ints."""
    return -(-a // b)


def head_block_sizes(num_heads: int, head_size: int, max_tile_elements: int) -> tuple[int, int, int]:
    """Tiles of kernels that handle a block of heads per program: (BLOCK_H, BLOCK_D, number of head blocks), with
    BLOCK_D the head size padded to a power of two and BLOCK_H * BLOCK_D <= max_tile_elements (BLOCK_H >= 1)."""
    block_d = next_power_of_2(head_size)
    block_h = min(next_power_of_2(num_heads), max(1, max_tile_elements // block_d))
    return block_h, block_d, cdiv(num_heads, block_h)


def upload(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a tensor on ``device``; on CUDA copied through pinned memory without waiting for the
    work already queued on the device."""
    tensor = torch.tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def geometry_key(tensors: tuple) -> tuple | None:
    """(shape, strides, dtype, device) of each tensor (None stays None), for caches of launch plans keyed by the
    geometry of their inputs; None unless each is a plain ``torch.Tensor`` (a subclass may behave otherwise)."""
    key = []
    for tensor in tensors:
        if tensor is None:
            key.append(None)
        elif type(tensor) is torch.Tensor:
            key.append((tensor.shape, tensor.stride(), tensor.dtype, tensor.device))
        else:
            return None
    return tuple(key)


def bounded_put(cache: dict, key, value, max_entries: int):
    """``value``, kept in ``cache`` under ``key``: the store of a bounded memo (of launch plans and the like) that is
    read with the dict's own ``cache.get(key)`` (None: a miss), so that a hit stays one plain dict lookup. A cache
    already holding ``max_entries`` entries first drops its oldest one in insertion order (FIFO: a hit does not
    refresh an entry; storing under a key already there drops the oldest all the same, and the key keeps its place
    unless it was that one). A None key means "not cacheable": nothing is kept."""
    if key is not None:
        if len(cache) >= max_entries:
            cache.pop(next(iter(cache)))
        cache[key] = value
    return value


class CachedLauncher:
    """``launcher(grid, args, constexprs, **options)`` does what ``kernel[grid](*args, **constexprs, **options)``
    does (options: ``num_warps``, ``num_stages``), with less Python per call
    once a variant has been launched: Triton's ``JITFunction.run`` binds and specialises every argument on every
    call (tens of µs for the decode kernel's 58 parameters); this launches the compiled kernel that Triton's own
    path returned for an earlier call with the same key, through the same launcher call ``JITFunction.run`` makes.

    The key is finer than Triton's specialisation by construction: the device, the constexprs and options, Triton's
    debug/instrumentation knobs, the Python type of every argument, and per argument: a tensor's dtype and
    data-pointer residue mod 128 (Triton specialises on 16-byte alignment), an int's value (a ``do_not_specialize``
    int: is it 1, is it a multiple of 16, its 32/64-bit range — all Triton can specialise an int on, so the key
    stays finer if the flag is changed later), a bool's value. Anything else — another argument type, constexprs
    passed out of their signature order, a Triton release other than 3.6-3.9 (where the launch call is known), the
    interpreter, pre-run or pipeline-inspection hooks — takes Triton's own path, as does the first call of every
    key. Not re-checked on the fast path: Triton's test that globals the kernel reads have not changed since it was
    compiled. ``plan`` fixes everything but the tensors of a launch (``LaunchPlan``: for callers that cache plans
    by the geometry of their inputs).
    """

    MAX_ENTRIES = 512

    def __init__(self, kernel):
        self.kernel = kernel
        self._entries: dict[tuple, object] = {}
        self._fingerprints: dict[tuple, object] = {}  # argument types -> fingerprint function (None: unsupported)
        self._enabled = _fast_launch_supported(kernel)
        if self._enabled:
            params = kernel.params
            self._constexpr_names = tuple(p.name for p in params if p.is_constexpr)
            self._positional = len(params) - len(self._constexpr_names)
            self._do_not_specialize = tuple(p.do_not_specialize for p in params[:self._positional])
            # the fast path appends the constexprs after the positional arguments: they must be the last params
            self._enabled = all(p.is_constexpr for p in params[self._positional:])

    def __call__(self, grid: tuple, args: tuple, constexprs: dict, **options) -> None:
        self.launch(grid, args, constexprs, options)

    def launch(self, grid: tuple, args: tuple, constexprs: dict, options: dict):
        """Launch; returns the compiled kernel when later launches with this key will reuse it, else None."""
        key = self._key(args, constexprs, options) if self._enabled else None
        try:
            compiled = self._entries.get(key) if key is not None else None
        except TypeError:  # an unhashable constexpr or option value
            key = compiled = None
        if compiled is None:
            compiled = self.kernel[grid](*args, **constexprs, **options)
            if key is None or not _launchable(compiled) or len(self._entries) >= self.MAX_ENTRIES:
                return None
            self._entries[key] = compiled
            return compiled
        run_compiled(compiled, key[0], (*grid, 1, 1)[:3], (*args, *constexprs.values()))
        return compiled

    def plan(self, grid: tuple, scalars: tuple, constexprs: dict, **options) -> "LaunchPlan":
        """A ``LaunchPlan``: this launch with everything but the leading tensor arguments fixed (the constexprs in
        any order: put in the signature's, which the fast path needs)."""
        if self._enabled and set(constexprs) == set(self._constexpr_names):
            constexprs = {name: constexprs[name] for name in self._constexpr_names}
        return LaunchPlan(self, grid, scalars, constexprs, options)

    def state(self):
        """What besides the arguments selects a compiled kernel: (current device, Triton's debug and
        instrumentation knobs); None when every launch takes Triton's own path (a hook, or no fast path)."""
        if not self._enabled or self.kernel.pre_run_hooks:
            return None
        return launch_state()

    def _key(self, args: tuple, constexprs: dict, options: dict):
        """The launch's key, or None (Triton's own path) when an argument or hook is outside what it covers."""
        if len(args) != self._positional or tuple(constexprs) != self._constexpr_names:
            return None
        state = self.state()
        if state is None:
            return None
        kinds = tuple(map(type, args))
        fingerprint = self._fingerprints.get(kinds, _MISSING)
        if fingerprint is _MISSING:
            fingerprint = self._fingerprints[kinds] = _fingerprint_function(kinds, self._do_not_specialize)
        if fingerprint is None:
            return None
        return (*state, tuple(options.items()), tuple(constexprs.values()), kinds, fingerprint(*args))


class LaunchPlan:
    """``plan(tensors)`` launches ``kernel[grid](*tensors, *scalars, **constexprs, **options)`` with the least
    Python: for callers that cache plans by the geometry of their inputs, so that a repeated call with tensors of
    the same shapes, strides and dtypes skips both its own launch arithmetic and the launcher's generic key.

    The caller's cache key must determine everything Triton specialises on except what the plan checks per call:
    the scalars and constexprs (fixed here) and every tensor's dtype. Per call the plan checks the launcher's
    ``state`` (current device, knobs, hooks) and the tensors' alignment: when every data pointer is 16-byte aligned
    (all Triton specialises a pointer on) it reuses the compiled kernel it found for that state; anything else goes
    through ``CachedLauncher.launch``, which keys every argument. On that reuse the tensors are passed as their data
    pointers (ints; tensors when a launch-enter hook wants to see them): Triton's C launcher then skips its
    ``data_ptr`` call and driver query per pointer (the query only turns a CPU tensor into an error: the caller's
    key must also pin the tensors' devices, or its caller guarantee them).
    """

    def __init__(self, launcher: CachedLauncher, grid: tuple, scalars: tuple, constexprs: dict, options: dict):
        self.launcher = launcher
        self.grid = (*grid, 1, 1)[:3]
        self.scalars = tuple(scalars)
        self.constexprs = constexprs
        self.options = options
        self.tail = (*self.scalars, *constexprs.values())
        self._compiled: dict[tuple, object] = {}  # launcher state -> compiled kernel (aligned tensors)
        # whether a compiled kernel was found (never in Triton's interpreter, nor where the launcher takes Triton's
        # own path): for callers of ``compiled`` to test before ``launch_state``, which needs a GPU driver
        self.found_compiled = False
        self._state = launcher.state

    def __call__(self, tensors: tuple) -> None:
        state = self._state()
        pointers = tuple(map(_data_ptr, tensors))
        aligned = state is not None and not functools.reduce(operator.or_, pointers) & 15
        compiled = self._compiled.get(state) if aligned else None
        if compiled is not None:
            run_compiled(compiled, state[0], self.grid,
                         (pointers if _no_hook(knobs.runtime.launch_enter_hook) else tensors) + self.tail)
            return
        compiled = self.launcher.launch(self.grid, tensors + self.scalars, self.constexprs, self.options)
        if aligned and compiled is not None and len(self._compiled) < 8:
            self._compiled[state] = compiled
            self.found_compiled = True

    def compiled(self, state):
        """The compiled kernel an earlier launch found for 16-byte aligned tensors under ``state``
        (``launch_state()``), for callers that launch it themselves (``run_compiled``); None if there is none or
        the kernel now has a pre-run hook (every launch then takes Triton's own path)."""
        return None if self.launcher.kernel.pre_run_hooks else self._compiled.get(state)


_data_ptr = torch.Tensor.data_ptr


def launch_state():
    """The part of every ``CachedLauncher.state`` that is not about one kernel: (current device, Triton's debug
    and instrumentation knobs); None while a pipeline-inspection hook is set (Triton's own path)."""
    if _HAS_STAGES_HOOK and knobs.runtime.add_stages_inspection_hook is not None:
        return None
    compilation = knobs.compilation
    return (_triton_driver().active.get_current_device(), knobs.runtime.debug, compilation.instrumentation_mode,
            compilation.fpsan_homomorphic_casts if _HAS_FPSAN else None)


def launch_context():
    """(``launch_state()``, the current stream of its device, enter hook, exit hook) for a caller that launches
    compiled kernels itself; None when a launch hook holds a hook (the launch then needs its metadata and tensors:
    ``run_compiled``) or the state is None. (``_no_hook`` and ``launch_state`` inline: this runs on every eager
    decode call; keep the state in step with ``launch_state``.)"""
    runtime = knobs.runtime
    enter_hook, exit_hook = runtime.launch_enter_hook, runtime.launch_exit_hook
    if not ((enter_hook is None or not getattr(enter_hook, "calls", True))
            and (exit_hook is None or not getattr(exit_hook, "calls", True))):
        return None
    if _HAS_STAGES_HOOK and runtime.add_stages_inspection_hook is not None:
        return None
    compilation = knobs.compilation
    active = _triton_driver().active
    device = active.get_current_device()
    return ((device, runtime.debug, compilation.instrumentation_mode,
             compilation.fpsan_homomorphic_casts if _HAS_FPSAN else None),
            active.get_current_stream(device), enter_hook, exit_hook)


def current_stream(device: int):
    """The current stream of a device, as Triton's launches read it."""
    return _triton_driver().active.get_current_stream(device)


def run_compiled(compiled, device: int, grid: tuple, full: tuple) -> None:
    """The launch ``JITFunction.run`` makes of a compiled kernel: ``grid`` has three entries, ``full`` is every
    argument, constexprs included, in signature order. (The launch metadata is only for an enter hook: not built
    without one.)"""
    stream = _triton_driver().active.get_current_stream(device)
    runtime = knobs.runtime
    enter_hook = runtime.launch_enter_hook
    metadata = None if _no_hook(enter_hook) else compiled.launch_metadata(grid, stream, *full)
    compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, metadata, enter_hook,
                 runtime.launch_exit_hook, *full)


def _no_hook(hook) -> bool:
    """Whether a launch hook knob holds no hook: None (Triton 3.6-) or an empty ``HookChain`` (later releases)."""
    return hook is None or not getattr(hook, "calls", True)


_MISSING = object()


def _fingerprint_function(kinds: tuple, do_not_specialize: tuple):
    """A function of the arguments (of these types) returning what, besides their types, Triton may specialise
    on; None if a type is not covered (tensors, int, float, bool, None)."""
    parts = []
    for index, (kind, unspecialised) in enumerate(zip(kinds, do_not_specialize)):
        name = f"a{index}"
        if issubclass(kind, torch.Tensor):
            parts.append(f"{name}.dtype, {name}.data_ptr() & 127")
        elif kind is int:
            parts.append(f"{name} == 1, {name} % 16 == 0, -2147483648 <= {name} < 2147483648, "
                         f"{name} >= 9223372036854775808" if unspecialised else name)
        elif kind is bool:
            parts.append(name)
        elif kind is not float and kind is not type(None):
            return None
    names = ", ".join(f"a{index}" for index in range(len(kinds)))
    namespace = {}
    exec(f"def fingerprint({names}):\n    return ({''.join(part + ', ' for part in parts)})\n", namespace)
    return namespace["fingerprint"]


_FAST_LAUNCH_RELEASES = ((3, 6), (3, 7), (3, 8), (3, 9))
# Knobs that not every supported release has (the key reads them when present).
_HAS_STAGES_HOOK = hasattr(knobs.runtime, "add_stages_inspection_hook")
_HAS_FPSAN = hasattr(knobs.compilation, "fpsan_homomorphic_casts")


def _triton_driver():
    return driver


def _fast_launch_supported(kernel) -> bool:
    """Triton 3.6-3.9, a compiled (not interpreted) ``@triton.jit`` function, and ``FLASHSERVE_FAST_LAUNCH`` not
    "0" (read when the kernel's module is imported: the switch for every launch through Triton's own path)."""
    if os.environ.get("FLASHSERVE_FAST_LAUNCH", "1") == "0":
        return False
    import triton
    from triton.runtime.jit import JITFunction
    release = tuple(int(part) for part in triton.__version__.split(".")[:2])
    return release in _FAST_LAUNCH_RELEASES and type(kernel) is JITFunction


def _launchable(compiled) -> bool:
    """Whether Triton's launch returned a compiled kernel with the launcher interface of 3.6-3.9."""
    return all(hasattr(compiled, name) for name in ("run", "function", "packed_metadata", "launch_metadata"))
