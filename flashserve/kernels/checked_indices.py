"""Index tensors whose values have passed their range checks, remembered until PyTorch sees them change.

The value checks of the public functions (``index_checks``) cost a device synchronisation on the GPU. The layers of
one decode step pass the same ``cache_seqlens`` and ``block_table`` objects with the same cache geometry, so only
the first layer's call needs the check: a later call whose index tensors are the same Python objects, unchanged
since the check passed, with the same integers (lengths, cache sizes), skips it.

"Unchanged" is PyTorch's version counter (``Tensor._version``, bumped by every in-place op on the tensor or on a
view of it) and the data pointer. Writes PyTorch does not see — a custom kernel or a CUDA-graph replay writing the
memory, an alias made through ``.data`` or DLPack — do not bump it, so values changed that way are not re-checked;
the kernels still clamp or mask every index (no read or write outside the tensors), as during graph capture.
A failed check is never remembered, and inference tensors (made under ``torch.inference_mode``) have no version
counter, so calls with them are checked every time.
"""
import weakref

from flashserve.kernels._launch import bounded_put

_MAX_ENTRIES = 16


class CheckedIndices:
    """A small memo of (index tensors, integers) whose checks passed. Not thread-safe beyond the GIL: a race
    only costs a repeated check."""

    def __init__(self, max_entries: int = _MAX_ENTRIES):
        self.max_entries = max_entries
        self.generation = 0  # bumped by clear(): memos kept elsewhere of checks that passed compare it
        # (ints, id of each tensor) -> per tensor (weak reference, version, data pointer), None for None
        self._entries: dict[tuple, tuple] = {}

    def passed(self, tensors: tuple, ints: tuple) -> bool:
        """Whether these very tensors (None allowed), unchanged, passed a check with these ``ints``."""
        entry = self._entries.get((ints, *map(id, tensors)))
        if entry is None:
            return False
        for tensor, seen in zip(tensors, entry):
            if tensor is not None and (seen[0]() is not tensor or tensor._version != seen[1]
                                       or tensor.data_ptr() != seen[2]):
                return False
        return True

    def remember(self, tensors: tuple, ints: tuple) -> None:
        """Record a passed check (the oldest entry makes room); nothing for tensors it cannot follow."""
        seen = []  # (a loop, not generators: this runs for every new index tensor)
        for t in tensors:
            if t is None:
                seen.append(None)
            elif t.is_inference():
                return
            else:
                seen.append((weakref.ref(t), t._version, t.data_ptr()))
        bounded_put(self._entries, (ints, *map(id, tensors)), tuple(seen), self.max_entries)

    def clear(self) -> None:
        """Forget every passed check (so do the memos that follow ``generation``)."""
        self._entries.clear()
        self.generation += 1
