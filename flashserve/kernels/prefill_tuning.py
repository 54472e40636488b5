"""Launch configurations of the prefill kernels: the autotuning spaces for Hopper and newer (the portable kernel's
and the TMA kernel's), their pruning by head dimension and shared memory, the single defaults elsewhere (and under
the interpreter), and the coarse length classes the autotuners are keyed on."""
import functools
import os

import torch
import triton

from flashserve.kernels._dispatch import triton_interpret_enabled


def tuning_config(block_m, block_n, num_warps, num_stages):
    """One point of the autotuning space: query/key tile sizes, warps and pipeline stages."""
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


# Hopper and newer: tiles of 128 query rows; smaller key tiles for head dims above 128; (64, 64) for short queries.
TUNED_CONFIGS = [
    tuning_config(128, 128, 8, 3),
    tuning_config(128, 64, 8, 3),
    tuning_config(128, 64, 4, 3),
    tuning_config(128, 128, 8, 2),
    tuning_config(128, 64, 8, 4),
    tuning_config(128, 32, 8, 2),
    tuning_config(64, 64, 4, 3),
    tuning_config(64, 32, 4, 2),
]
SHARED_MEMORY_BYTES = 227 * 1024  # per-block limit of H100/H200


def tma_config(block_m, block_n, num_warps, num_stages, persistent=0, maxnreg=None):
    """One point of the TMA kernel's space: tiles, warps, stages, ``persistent`` (programs per SM of a persistent
    grid; 0: one program per work item) and ``maxnreg`` (a register cap per thread that lets two programs share an
    SM)."""
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "PERSISTENT": persistent}, num_warps=num_warps,
                         num_stages=num_stages, maxnreg=maxnreg)


# The TMA kernel (head dims 16..128): 128-row tiles with 64- or 128-key tiles and 2-3 stages (one program per SM,
# 140-250 registers per thread at d 128); (128, 64) capped at 128 registers with 2 stages, and (64, 64) with four
# warps, where two programs share an SM (one's softmax and loads overlap the other's MMAs); persistent variants of
# both kinds for short sequences (many small work items). Compiled for sm_90 by compile_prefill_tma.py: no spills.
TMA_CONFIGS = [
    tma_config(128, 128, 8, 2),
    tma_config(128, 128, 8, 3),
    tma_config(128, 64, 8, 3),
    tma_config(128, 64, 8, 2, maxnreg=128),
    tma_config(64, 64, 4, 2),
    tma_config(128, 128, 8, 2, persistent=1),
    tma_config(128, 64, 8, 2, persistent=2, maxnreg=128),
    tma_config(64, 64, 4, 2, persistent=2),
]
SM_SHARED_MEMORY_BYTES = 228 * 1024  # per SM, H100/H200 (each resident program also takes 1 KiB)


def shared_memory_bytes(block_m, block_n, block_d, num_stages, element_size):
    """Rough shared-memory need of a config: the Q tile plus num_stages K and V tiles."""
    return (block_m * block_d + 2 * num_stages * block_n * block_d) * element_size


def prune_configs(configs, named_args, **kwargs):
    """Keep the configs that fit the head dim: (128, 32) and (64, 32) only above d = 128, the others up to it; no
    128-row tiles when a tile never holds more than 64 query rows (no GQA packing and max_seqlen_q <= 64)."""
    args = {**named_args, **kwargs}
    block_d = args["BLOCK_D"]
    element_size = args["q_ptr"].element_size()
    short_rows = args["HEADS_PER_TILE"] == 1 and args["tune_seqlen_q"] == 0
    kept = []
    for config in configs:
        block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
        if short_rows and block_m > 64:
            continue
        if (block_n == 32) != (block_d > 128):
            continue
        if block_d > 128 and block_n == 128:
            continue
        if shared_memory_bytes(block_m, block_n, block_d, config.num_stages, element_size) > SHARED_MEMORY_BYTES:
            continue
        kept.append(config)
    return kept or [tuning_config(64, 32, 4, 1)]


def tma_shared_memory_bytes(config, head_dim: int, element_size: int) -> int:
    """Shared memory of a TMA config: ``shared_memory_bytes`` plus, in a persistent grid, the O tile's staging
    buffer (its TMA store may still be in flight when the next item starts; compiled sizes agree within 1 KiB)."""
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    staging = block_m * head_dim * element_size if config.kwargs["PERSISTENT"] else 0
    return shared_memory_bytes(block_m, block_n, head_dim, config.num_stages, element_size) + staging


def prune_tma_configs(configs, named_args, **kwargs):
    """The TMA configs that fit in shared memory, and whose persistent programs all fit on one SM at once (a
    persistent program that has to wait for a slot would start its share of the work late)."""
    args = {**named_args, **kwargs}
    head_dim, element_size = args["HEAD_DIM"], args["q_ptr"].element_size()
    kept = []
    for config in configs:
        need = tma_shared_memory_bytes(config, head_dim, element_size) + 1024
        if need <= SHARED_MEMORY_BYTES and config.kwargs["PERSISTENT"] * need <= SM_SHARED_MEMORY_BYTES:
            kept.append(config)
    return kept or [tma_config(64, 32, 4, 1)]


def default_tma_config(device: torch.device, element_size: int):
    """The TMA kernel's config when not autotuning (as ``default_config``): a dict of its meta-parameters."""
    if device.type != "cuda":
        block_m, block_n, num_warps, num_stages = 64, 32, 4, 1
    elif element_size > 2:
        block_m, block_n, num_warps, num_stages = 64, 64, 4, 2
    else:
        block_m, block_n, num_warps, num_stages = 128, 64, 8, 3  # one of TMA_CONFIGS
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, PERSISTENT=0, num_warps=num_warps, num_stages=num_stages)


def default_config(device: torch.device, block_d: int, element_size: int):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) when not autotuning: small tiles under the interpreter (fast and
    they exercise the multi-tile paths), conservative ones on pre-Hopper GPUs."""
    if device.type != "cuda":
        return 64, 32, 4, 1
    if block_d > 128 or element_size > 2:
        return 64, 32, 4, 2
    return 128, 64, (4 if block_d <= 64 else 8), 2


def use_autotune(device: torch.device) -> bool:
    """Autotune on Hopper and newer, unless ``FLASHSERVE_AUTOTUNE=0`` (tests use it to skip the tuning compiles)."""
    if device.type != "cuda" or triton_interpret_enabled() or os.environ.get("FLASHSERVE_AUTOTUNE", "1") == "0":
        return False
    return compute_capability_major(device.index if device.index is not None else torch.cuda.current_device()) >= 9


@functools.lru_cache(maxsize=None)
def compute_capability_major(device_index: int) -> int:
    """The CUDA device's compute capability major (9 for Hopper), read once per device."""
    return torch.cuda.get_device_capability(device_index)[0]


LENGTH_CLASS_BOUNDS = (64, 512, 4096)
# Queries shorter than this pack the query heads of a KV group into the tile rows (see ``prefill.py``).
HEAD_PACKING_MAX_QUERY = 64


def length_class(n: int) -> int:
    """Coarse class of a sequence length (<= 64, <= 512, <= 4096, longer): the autotuner runs once per class,
    not once per length."""
    return sum(n > bound for bound in LENGTH_CLASS_BOUNDS)
