"""Launch configurations of the fused-MoE grouped GEMMs: a measured table per GPU model, a heuristic elsewhere.

A configuration is chosen from the number of token-expert pairs a call routes (``num_tokens * top_k``) through
buckets (``TOKEN_BUCKETS``, or a table's own), so a model meets one configuration per bucket and the engine's
warm-up, which runs every prefill length class and decode batch size, compiles them all before serving. Each choice
is a (gate/up, down) pair of ``MoeGemmConfig``.

Tables: ``moe_tuned/<GPU name, spaces as _>.json`` beside this module, written by ``python
benchmarks/bench_moe.py --tune --out DIR`` (into DIR/moe_tuned/) on that GPU and used on CUDA devices of that name
(``torch.cuda.get_device_name``): ``{"device", "token_buckets": [...], "entries": [{"num_experts",
"hidden_size", "intermediate_size" (per tensor-parallel rank: the stacked weights' I), "top_k", "configs":
[[gate_up, down], ...] one pair per bucket, each a dict of MoeGemmConfig's fields}]}``.

``default_configs`` (no table entry), per bucket at its representative pair count (``REPRESENTATIVE_PAIRS``):
- At most 8 rows per expert on average (decode): the GEMMs stream each hit expert's weights once; BLOCK_M 16,
  BLOCK_K 128, 4 warps, 4 stages (the tiles the H200 run measured at 88-98% of the copy bandwidth on Mixtral)
  and column tiles (gate/up 64, 32 or 16, down 128 or 64) as wide as still give ``TARGET_PROGRAMS`` programs
  over the experts hit: few programs leave SMs idle and make a long tail (Qwen3-30B-A3B's 768-wide experts at
  4 tokens, 30 experts hit, give 360 programs of 64 columns but 720 of 32); the down GEMM also splits K (shares
  of at least ``MIN_SPLIT_K_DEPTH``) while its 64-wide tiles give too few programs (Mixtral at 1 token: 2
  experts x 64 tiles for 132 SMs).
- More rows: BLOCK_M 32, 64 or 128 by the mean rows per expert (the padding to BLOCK_M wastes up to BLOCK_M - 1
  rows per expert; wider tiles use the tensor cores better), with the output tiles vLLM's H200 tables choose for
  these shapes (its gate/up tile of N columns is our gated tile of N / 2: gate and up side by side): 32 x 128 x 128
  (4 warps, 3 stages), 64 x 128 x 128 and 128 x 256 x 64 (8 warps, 4 stages).
Stages are lowered (then BLOCK_K) until a program's pipeline fits the device's shared memory.
"""
import functools
import json
import os
from dataclasses import asdict, dataclass, replace

import torch

from flashserve.kernels._launch import cdiv
from flashserve.kernels.skinny_gemm_plans import pipeline_bytes, shared_memory_bytes


@dataclass(frozen=True, slots=True)
class MoeGemmConfig:
    """Tiles and launch options of one grouped GEMM (BLOCK_M rows of one expert per program). The down GEMM only:
    ``split_k`` programs per tile, each over a share of K; ``pair_outputs``: each pair's product stored in the
    input dtype and summed per token by a third launch, instead of atomic adds into an fp32 output (not with
    split_k)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 1
    pair_outputs: bool = False


# Upper bounds (inclusive) of ``num_tokens * top_k`` per configuration bucket; the last bucket is unbounded.
TOKEN_BUCKETS = (16, 64, 512, 4096, 16384)
REPRESENTATIVE_PAIRS = (8, 32, 256, 2048, 8192, 32768)  # the pair count each bucket's default is sized for
TARGET_PROGRAMS = 512  # ~4 programs per SM of an H100/H200
MIN_SPLIT_K_DEPTH = 2048  # the least K a share of a split down GEMM gets (shorter shares: mostly pipeline fill)
TABLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "moe_tuned")


@dataclass(frozen=True, slots=True)
class MoeConfigTable:
    """Tuned configurations: per (num_experts, hidden_size, intermediate_size, top_k), one (gate_up, down) pair
    per bucket of ``token_buckets`` (then the unbounded one)."""

    device: str
    token_buckets: tuple[int, ...]
    entries: dict[tuple[int, int, int, int], tuple[tuple[MoeGemmConfig, MoeGemmConfig], ...]]

    @classmethod
    def from_json(cls, data: dict) -> "MoeConfigTable":
        """Parse the file format of the module docstring; ValueError naming what is wrong."""
        try:
            buckets = tuple(int(bound) for bound in data["token_buckets"])
            entries = {}
            for entry in data["entries"]:
                key = tuple(int(entry[name]) for name in ("num_experts", "hidden_size", "intermediate_size",
                                                           "top_k"))
                pairs = tuple(tuple(MoeGemmConfig(**config) for config in pair) for pair in entry["configs"])
                if len(pairs) != len(buckets) + 1 or any(len(pair) != 2 for pair in pairs):
                    raise ValueError(f"entry {key} must hold {len(buckets) + 1} (gate_up, down) pairs")
                entries[key] = pairs
            return cls(str(data["device"]), buckets, entries)
        except (KeyError, TypeError) as error:
            raise ValueError(f"malformed MoE config table: {error!r}") from None

    def to_json(self) -> dict:
        return dict(device=self.device, token_buckets=list(self.token_buckets), entries=[
            dict(num_experts=key[0], hidden_size=key[1], intermediate_size=key[2], top_k=key[3],
                 configs=[[_compact(config) for config in pair] for pair in pairs])
            for key, pairs in self.entries.items()])


def _compact(config: MoeGemmConfig) -> dict:
    defaults = MoeGemmConfig(1, 1, 1, 1, 1)
    return {name: value for name, value in asdict(config).items()
            if name not in ("split_k", "pair_outputs") or value != getattr(defaults, name)}


def table_path(device_name: str) -> str:
    return os.path.join(TABLE_DIR, device_name.replace(" ", "_") + ".json")


@functools.lru_cache(maxsize=None)
def device_table(device_name: str) -> MoeConfigTable | None:
    """The tuned table of a GPU model (read once), None when there is no file for it."""
    path = table_path(device_name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return MoeConfigTable.from_json(json.load(f))


@functools.lru_cache(maxsize=None)
def _cuda_device(index: int) -> tuple[MoeConfigTable | None, int]:
    return device_table(torch.cuda.get_device_name(index)), shared_memory_bytes(index)


def bucket_index(num_pairs: int, buckets: tuple[int, ...] = TOKEN_BUCKETS) -> int:
    """The index of the bucket of ``buckets`` (or the unbounded one after them) holding ``num_pairs``."""
    for index, bound in enumerate(buckets):
        if num_pairs <= bound:
            return index
    return len(buckets)


def _fit(config: MoeGemmConfig, gated: bool, element_size: int, smem: int | None) -> MoeGemmConfig:
    """Fewer stages (down to 2), then a shallower BLOCK_K (down to 32), until the pipeline fits ``smem``."""
    while smem is not None and pipeline_bytes(config.block_m, config.block_n, config.block_k, config.num_stages,
                                              gated, element_size) > smem:
        if config.num_stages > 2:
            config = replace(config, num_stages=config.num_stages - 1)
        elif config.block_k > 32:
            config = replace(config, block_k=config.block_k // 2)
        else:
            break
    return config


def _widest(options: tuple[int, ...], tiles_of, target: float) -> int:
    """The widest of ``options`` (widest first) whose program count ``tiles_of(width)`` reaches ``target``, else
    the narrowest."""
    return next((width for width in options if tiles_of(width) >= target), options[-1])


@functools.lru_cache(maxsize=None)
def default_configs(bucket: int, num_experts: int, hidden_size: int, intermediate_size: int,
                    element_size: int = 2, smem: int | None = None) -> tuple[MoeGemmConfig, MoeGemmConfig]:
    """The heuristic (gate_up, down) pair of a bucket of ``TOKEN_BUCKETS`` (module docstring)."""
    pairs = REPRESENTATIVE_PAIRS[bucket]
    rows = pairs / num_experts
    if rows <= 8:
        hit = num_experts * (1 - (1 - 1 / num_experts) ** pairs)  # experts expected to get a pair
        up_n = _widest((64, 32, 16), lambda n: hit * cdiv(intermediate_size, n), TARGET_PROGRAMS)
        down_n = _widest((128, 64), lambda n: hit * cdiv(hidden_size, n), TARGET_PROGRAMS)
        split_k = 1
        while (split_k < 4 and hit * cdiv(hidden_size, down_n) * split_k < TARGET_PROGRAMS
               and intermediate_size // (2 * split_k) >= MIN_SPLIT_K_DEPTH):
            split_k *= 2
        up, down = MoeGemmConfig(16, up_n, 128, 4, 4), MoeGemmConfig(16, down_n, 128, 4, 4, split_k)
    elif rows <= 24:
        up, down = MoeGemmConfig(32, 64, 128, 4, 3), MoeGemmConfig(32, 128, 128, 4, 3)
    elif rows <= 96:
        up, down = MoeGemmConfig(64, 64, 128, 8, 4), MoeGemmConfig(64, 128, 128, 8, 4)
    else:
        up, down = MoeGemmConfig(128, 128, 64, 8, 4), MoeGemmConfig(128, 256, 64, 8, 4)
    return _fit(up, True, element_size, smem), _fit(down, False, element_size, smem)


def moe_configs(num_tokens: int, num_experts: int, hidden_size: int, intermediate_size: int, top_k: int,
                element_size: int = 2, table: MoeConfigTable | None = None, device: torch.device | None = None
                ) -> tuple[MoeGemmConfig, MoeGemmConfig]:
    """(gate_up config, down config) for a call routing ``num_tokens`` tokens to ``top_k`` of ``num_experts``
    experts of the given shape (``intermediate_size``: this rank's). The entry of ``table`` (default: the tuned
    table of a CUDA ``device``'s GPU model, if any) when it holds the shape, else ``default_configs`` (fitted to
    the device's shared memory). Tables are for 2-byte inputs; for fp32 (``element_size`` 4, the tests' and parity
    runs' precision) BLOCK_K is at most 32 and the stages 3, which keeps the buffers in shared memory."""
    smem = None
    if device is not None and device.type == "cuda":
        device_table_, smem = _cuda_device(device.index if device.index is not None else torch.cuda.current_device())
        table = table or device_table_
    num_pairs = num_tokens * top_k
    entry = table.entries.get((num_experts, hidden_size, intermediate_size, top_k)) if table else None
    if entry is not None:
        pair = entry[bucket_index(num_pairs, table.token_buckets)]
    else:
        pair = default_configs(bucket_index(num_pairs), num_experts, hidden_size, intermediate_size, 2, smem)
    if element_size <= 2:
        return pair
    return tuple(replace(config, block_k=min(config.block_k, 32), num_stages=min(config.num_stages, 3))
                 for config in pair)
