"""Autotuning results that outlive the process: ``triton.autotune`` tunes each new key (seconds per key) and keeps
the winner in memory only; ``PersistentTuning`` stores the winners on disk and puts them back into the
Autotuner's cache, so a restarted engine launches at once.

Files: ``<cache root>/autotune/<name>-<sha256>.json``, the cache root being ``$FLASHSERVE_CACHE_DIR`` (default
``~/.cache/flashserve``). The sha256 covers the kernel name, the GPU name (``torch.cuda.get_device_name``),
``triton.__version__``, a hash of the kernel's code (``JITFunction.cache_key``: its source, the jit functions it
calls and the constexpr globals it reads; a sha256 of the Python source where there is no ``cache_key``), the
source of the ``depends`` functions (e.g. the config pruning), the Autotuner's key names and the config list, so a
change of any of them starts a fresh file. A file holds these same fields and ``entries``:
``[[key, index], ...]``, ``key`` the Autotuner's tuning key as a JSON list (its ``key`` argument values, then
the dtype strings of the tensor arguments) and ``index`` the position of the chosen config in the config list.

Reading never raises: a missing, unreadable or corrupt file counts as empty, and an entry whose index is out of
range is skipped. Writing merges with what is on disk under a lock file and replaces the file atomically (temp
file + ``os.replace``), so concurrent writers (several engines, pytest-xdist workers) keep each other's entries;
an unwritable directory logs a warning. Only CUDA devices outside the interpreter persist; elsewhere both are
no-ops. Triton's Autotuner keeps one cache for all devices, so one process should tune one kind of GPU.

Use::

    tuning = PersistentTuning("prefill", autotuned_kernel)
    tuning.launch(device, grid, *args, **meta)  # reads the file before the first launch on a device and
                                                # writes it after a launch that tuned a new key
    save_all()                                  # force a save of every kernel that launched (e.g. at shutdown)
"""
import contextlib
import hashlib
import inspect
import json
import logging
import os
import tempfile

import torch
import triton

from flashserve.cache_dir import cache_root
from flashserve.kernels._dispatch import triton_interpret_enabled

try:
    import fcntl
except ImportError:  # not POSIX: atomic replacement only, no lock
    fcntl = None

LOGGER = logging.getLogger("flashserve")
_KEY_TYPES = (bool, int, float, str, type(None))
_REGISTRY = []  # every PersistentTuning, for save_all


def gpu_name(device: torch.device) -> str:
    """The GPU's name, e.g. ``NVIDIA H200`` (a function of its own so that tests can replace it)."""
    return torch.cuda.get_device_name(device)


def source_hash(fn) -> str:
    """Hash of a kernel's code: the first ``cache_key`` down the ``.fn`` chain (a JITFunction), else a sha256 of
    the Python function's source (the interpreter's InterpretedFunction has no ``cache_key``)."""
    while not inspect.isfunction(fn):
        key = getattr(fn, "cache_key", None)
        if isinstance(key, str):
            return key
        fn = fn.fn
    return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()


def _storable(key) -> bool:
    """Whether a tuning key survives a JSON round trip as a list with its element types intact."""
    return all(isinstance(v, _KEY_TYPES) for v in key)


def persists(device: torch.device) -> bool:
    """Whether results tuned on ``device`` are stored: CUDA devices, outside Triton's interpreter."""
    return device.type == "cuda" and not triton_interpret_enabled()


def save_all() -> None:
    """Save the results of every kernel on every device it has launched on (the engine may call this at exit)."""
    for tuning in _REGISTRY:
        for device in tuning.devices:
            tuning.save(device)


@contextlib.contextmanager
def _locked(path: str):
    """Hold an exclusive lock on ``path + '.lock'`` (serialises the read-merge-write of concurrent savers)."""
    if fcntl is None:
        yield
        return
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


class PersistentTuning:
    """The on-disk results of one ``triton.autotune``-wrapped kernel (``autotuner``), stored under ``name``.
    ``depends``: Python functions that shape the results without being part of the kernel (its config pruning);
    their source joins the file's hash."""

    def __init__(self, name: str, autotuner, depends=()):
        self.name = name
        self.autotuner = autotuner
        self.depends = tuple(depends)
        self.devices = set()  # devices whose file has been read (and that launch() has run on)
        _REGISTRY.append(self)

    def _header(self, device: torch.device) -> dict:
        return {"kernel": self.name, "gpu": gpu_name(device), "triton": triton.__version__,
                "source": source_hash(self.autotuner.fn), "depends": [source_hash(fn) for fn in self.depends],
                "keys": list(self.autotuner.keys), "configs": [str(c) for c in self.autotuner.configs]}

    def _locate(self, device: torch.device):
        header = self._header(device)
        digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()
        return os.path.join(cache_root(), "autotune", f"{self.name}-{digest}.json"), header

    def path(self, device: torch.device) -> str:
        """The file of ``device``'s results: ``<cache root>/autotune/<name>-<sha256 of the header>.json``."""
        return self._locate(device)[0]

    def _read(self, path: str) -> dict:
        """The file's entries as {key tuple: config index}; {} for a missing or corrupt file."""
        try:
            with open(path) as f:
                entries = json.load(f)["entries"]
        except (OSError, ValueError, TypeError, KeyError):
            return {}
        count = len(self.autotuner.configs)
        return {tuple(entry[0]): entry[1] for entry in (entries if isinstance(entries, list) else [])
                if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list) and _storable(entry[0])
                and type(entry[1]) is int and 0 <= entry[1] < count}

    def load(self, device: torch.device) -> int:
        """Fill the Autotuner's cache from ``device``'s file (entries already in memory win); returns the number
        of keys added."""
        self.devices.add(device)
        if not persists(device):
            return 0
        cache, configs = self.autotuner.cache, self.autotuner.configs
        added = 0
        for key, index in self._read(self.path(device)).items():
            if key not in cache:
                cache[key] = configs[index]
                added += 1
        return added

    def save(self, device: torch.device) -> bool:
        """Merge the Autotuner's cache into ``device``'s file; False when nothing was written (not a persisting
        device, or the directory is unwritable: logged). Configs outside the config list (a pruning fallback)
        are not stored."""
        if not persists(device):
            return False
        configs = self.autotuner.configs
        ours = {key: configs.index(config) for key, config in list(self.autotuner.cache.items())
                if config in configs and _storable(key)}
        path, header = self._locate(device)
        folder = os.path.dirname(path)
        try:
            os.makedirs(folder, exist_ok=True)
            with _locked(path):
                entries = {**self._read(path), **ours}
                document = {**header, "entries": [[list(key), index] for key, index in entries.items()]}
                fd, staging = tempfile.mkstemp(prefix=f".{self.name}-", suffix=".tmp", dir=folder)
                try:
                    with os.fdopen(fd, "w") as f:
                        os.fchmod(f.fileno(), 0o644)  # not mkstemp's 0o600: other users may share the cache
                        json.dump(document, f)
                    os.replace(staging, path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(staging)
                    raise
        except OSError as error:
            LOGGER.warning("could not save the autotuning results of %s to %s: %s", self.name, path, error)
            return False
        return True

    def launch(self, device: torch.device, grid, *args, **kwargs):
        """Launch the autotuned kernel on ``grid``, reading ``device``'s file before the first launch there and
        saving after a launch that tuned a new key. Steady state: one set lookup and one length comparison."""
        if device not in self.devices:
            self.load(device)
        cache = self.autotuner.cache
        size = len(cache)
        self.autotuner[grid](*args, **kwargs)
        if len(cache) != size:
            self.save(device)
