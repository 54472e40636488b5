"""Host-side launch arithmetic in plain Python: ``triton.next_power_of_2`` and ``triton.cdiv`` are constexpr
functions that cost microseconds per call from Python, which adds up on launch-bound decode steps; and the upload of
small host lists."""
import torch


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
