"""Launch configurations of the ``merge_attn_states`` kernel: the candidates ``benchmarks/bench_merge.py`` sweeps,
the table of the ones it measured best, and the choice per call.

A config is a tile size in elements (a program merges ``BLOCK_T`` tokens x ``BLOCK_H`` heads x ``BLOCK_D``
dimensions, about ``tile_elements`` in all), the warps per program, whether the loads and stores carry the
``evict_first`` hint (each byte is read or written once: leave L2 to other data), and a cap on BLOCK_H
(``max_block_h``; 0: none). The LSEs are (H, T): a tile of one head and several tokens reads them as one
contiguous run, a tile of one token and several heads as 4-byte pieces T apart. The table is keyed by the bytes
of one token's row (heads x head size x element size; fp16 and bf16 share entries) and a class of token counts;
anything else gets ``DEFAULT``.
"""
import functools
from typing import NamedTuple

from flashserve.kernels._launch import cdiv, next_power_of_2


class MergeConfig(NamedTuple):
    tile_elements: int
    num_warps: int
    evict_first: bool
    max_block_h: int = 0


DEFAULT = MergeConfig(2048, 4, False)  # one token x up to 16 heads of 128 per program (the first kernel's tiling)
CANDIDATES = tuple(MergeConfig(tile, warps, evict, max_block_h) for tile in (2048, 4096, 8192) for warps in (4, 8)
                   for evict in (False, True) for max_block_h in (0, 1))
# Upper bounds of the token classes (the last class is open-ended).
TOKEN_CLASS_BOUNDS = (768, 2048)
# (row bytes, token class) -> config, from bench_merge.py's sweep on the H200 (it prints this table).
TUNED: dict[tuple[int, int], MergeConfig] = {  # NVIDIA H200, triton 3.6, 2026-12-02
    (4096, 0): MergeConfig(2048, 8, True),
    (4096, 1): MergeConfig(4096, 4, True),
    (4096, 2): MergeConfig(2048, 8, True),
    (8192, 0): MergeConfig(8192, 8, True),
    (8192, 1): MergeConfig(2048, 8, True),
    (8192, 2): MergeConfig(2048, 8, False, 1),  # from bench_merge.py --tokens 4096 --heads 16,32 (2026-12-02)
    (12288, 0): MergeConfig(4096, 4, True),
    (12288, 1): MergeConfig(2048, 8, True),
    (12288, 2): MergeConfig(2048, 8, False),
}


def token_class(num_tokens: int) -> int:
    """Index of the class of ``num_tokens`` among ``TOKEN_CLASS_BOUNDS`` (0: at most the first bound)."""
    for index, bound in enumerate(TOKEN_CLASS_BOUNDS):
        if num_tokens <= bound:
            return index
    return len(TOKEN_CLASS_BOUNDS)


def choose_config(num_tokens: int, num_heads: int, head_size: int, element_size: int) -> MergeConfig:
    """The tuned config of this shape's class, else ``DEFAULT``."""
    return TUNED.get((num_heads * head_size * element_size, token_class(num_tokens)), DEFAULT)


@functools.lru_cache(maxsize=1024)
def tile_shape(config: MergeConfig, num_heads: int, head_size: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_H, BLOCK_D, head blocks) of ``config``: BLOCK_D is the head size padded to a power of two;
    BLOCK_H the power of two <= tile / BLOCK_D that pads the heads least (ties: the larger), so H 48 takes blocks
    of 16, not one of 64 with a quarter idle (at most ``max_block_h`` when set); BLOCK_T fills the rest of the
    tile with tokens."""
    block_d = next_power_of_2(head_size)
    widest = max(1, config.tile_elements // block_d)
    if config.max_block_h:
        widest = min(widest, config.max_block_h)
    candidates = [1 << k for k in range(widest.bit_length()) if 1 << k <= next_power_of_2(num_heads)]
    block_h = min(candidates, key=lambda h: (cdiv(num_heads, h) * h, -h))
    block_t = max(1, config.tile_elements // (block_h * block_d))
    return block_t, block_h, block_d, cdiv(num_heads, block_h)
