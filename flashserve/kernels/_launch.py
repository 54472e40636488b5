"""Host-side launch arithmetic in plain Python: ``triton.next_power_of_2`` and ``triton.cdiv`` are constexpr
functions that cost microseconds per call from Python, which adds up on launch-bound decode steps."""


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ints."""
    return -(-a // b)
