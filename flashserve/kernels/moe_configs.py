"""Launch configurations of the fused-MoE grouped GEMMs: a small table per layer shape and a default elsewhere.

A configuration is chosen from the number of token-expert pairs a call routes (``num_tokens * top_k``), so a
model meets only a few of them (one per bucket of ``TOKEN_BUCKETS``) and the engine's warm-up, which runs every
prefill length class and decode batch size, compiles them all before serving.

Each entry gives one ``MoeGemmConfig`` for the gate/up GEMM and one for the down GEMM (of the same BLOCK_M: one
permutation serves both). The table holds the shapes of ``benchmarks/bench_moe.py`` (Qwen3-30B-A3B and Mixtral
8x7B layers); its entries are first choices by the tiles' arithmetic (narrow tiles while few rows reach an expert,
wide ones for prefill), not yet measured: ``python benchmarks/bench_moe.py --tune`` sweeps the candidates on a GPU
and prints entries in this format to replace them.
"""
from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class MoeGemmConfig:
    """Tiles and launch options of one grouped GEMM (BLOCK_M rows of one expert per program)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Upper bounds (inclusive) of ``num_tokens * top_k`` per configuration bucket; the last bucket is unbounded.
TOKEN_BUCKETS = (64, 512, 4096)

_SMALL = MoeGemmConfig(16, 64, 128, 4, 4)
_MEDIUM = MoeGemmConfig(32, 64, 128, 4, 4)
_LARGE = MoeGemmConfig(64, 128, 64, 8, 3)
_HUGE = MoeGemmConfig(128, 128, 64, 8, 3)
DEFAULT_CONFIGS = ((_SMALL, _SMALL), (_MEDIUM, _MEDIUM), (_LARGE, _LARGE), (_HUGE, _HUGE))

# (num_experts, hidden_size, intermediate_size, top_k) -> one (gate_up, down) pair per token bucket (the buckets
# of TOKEN_BUCKETS, then the unbounded one).
TUNED_CONFIGS: dict[tuple[int, int, int, int], tuple[tuple[MoeGemmConfig, MoeGemmConfig], ...]] = {
    # Qwen3-30B-A3B: 128 experts of intermediate 768 (few rows per expert even at large batches).
    (128, 2048, 768, 8): (
        (MoeGemmConfig(16, 64, 128, 4, 4), MoeGemmConfig(16, 64, 128, 4, 4)),
        (MoeGemmConfig(16, 64, 128, 4, 4), MoeGemmConfig(16, 128, 64, 4, 4)),
        (MoeGemmConfig(32, 128, 64, 4, 4), MoeGemmConfig(32, 128, 64, 4, 4)),
        (MoeGemmConfig(64, 128, 64, 8, 3), MoeGemmConfig(64, 128, 64, 8, 3)),
    ),
    # Mixtral 8x7B: 8 experts of intermediate 14336 (many rows per expert).
    (8, 4096, 14336, 2): (
        (MoeGemmConfig(16, 64, 128, 4, 4), MoeGemmConfig(16, 64, 128, 4, 4)),
        (MoeGemmConfig(64, 128, 64, 8, 3), MoeGemmConfig(64, 128, 64, 8, 3)),
        (MoeGemmConfig(128, 128, 64, 8, 3), MoeGemmConfig(128, 128, 64, 8, 3)),
        (MoeGemmConfig(128, 128, 64, 8, 3), MoeGemmConfig(128, 128, 64, 8, 3)),
    ),
}


def bucket_index(num_pairs: int) -> int:
    """The index of the bucket of ``TOKEN_BUCKETS`` (or the unbounded one after them) holding ``num_pairs``."""
    for index, bound in enumerate(TOKEN_BUCKETS):
        if num_pairs <= bound:
            return index
    return len(TOKEN_BUCKETS)


def moe_configs(num_tokens: int, num_experts: int, hidden_size: int, intermediate_size: int, top_k: int,
                element_size: int = 2, table: dict | None = None) -> tuple[MoeGemmConfig, MoeGemmConfig]:
    """(gate_up config, down config) for a call routing ``num_tokens`` tokens to ``top_k`` of ``num_experts``
    experts of the given shape: the table's entry when the shape is in ``table`` (default ``TUNED_CONFIGS``), else
    ``DEFAULT_CONFIGS``. The tiles are sized for 2-byte inputs; for fp32 (``element_size`` 4, the tests' and
    parity runs' precision) BLOCK_K drops to 32 and the stages to 3, which keeps the buffers in shared memory."""
    table = TUNED_CONFIGS if table is None else table
    configs = table.get((num_experts, hidden_size, intermediate_size, top_k), DEFAULT_CONFIGS)
    pair = configs[bucket_index(num_tokens * top_k)]
    if element_size <= 2:
        return pair
    return tuple(replace(config, block_k=min(config.block_k, 32), num_stages=min(config.num_stages, 3))
                 for config in pair)
