"""The fused-MoE tuning sweep's bookkeeping (``benchmarks/moe_tune.py``), without a GPU: the shapes it covers, its
candidates (the default among them, every other one fitting the shared memory), its size, and the table file it
writes being the one ``moe_configs`` reads."""
import json
import os
import sys

from flashserve.kernels.moe_configs import TOKEN_BUCKETS, MoeConfigTable, default_configs
from flashserve.kernels.skinny_gemm_plans import pipeline_bytes

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import moe_tune  # noqa: E402

SHAPES = {"qwen3-30b-a3b": (2048, 128, 8, 768), "mixtral-8x7b": (4096, 8, 2, 14336)}
SMEM = moe_tune.H200_SHARED_MEMORY


def test_shapes_cover_the_tensor_parallel_shards():
    shapes = dict(moe_tune.tune_shapes(SHAPES, list(SHAPES), [1, 2, 4]))
    assert shapes["qwen3-30b-a3b/tp2"] == (2048, 128, 8, 384) and shapes["qwen3-30b-a3b/tp4"][3] == 192
    assert shapes["mixtral-8x7b/tp4"][3] == 3584 and len(shapes) == 6


def test_candidates_hold_the_default_and_fit():
    for _, shape in moe_tune.tune_shapes(SHAPES, list(SHAPES), [1, 2, 4]):
        hidden, num_experts, _, intermediate = shape
        for bucket in range(len(TOKEN_BUCKETS) + 1):
            for gated in (True, False):
                found = moe_tune.candidates(shape, bucket, gated, SMEM)
                assert found[0] == default_configs(bucket, num_experts, hidden, intermediate, 2, SMEM)[not gated]
                assert len(found) == len(set(found)) > 4
                assert all(pipeline_bytes(c.block_m, c.block_n, c.block_k, c.num_stages, gated, 2) <= SMEM
                           for c in found)
                assert all(c.split_k == 1 and not c.pair_outputs for c in found) or not gated
                assert gated or any(c.pair_outputs for c in found)
                assert not any(c.pair_outputs and c.split_k > 1 for c in found)
                assert all(intermediate // c.split_k >= moe_tune.MIN_SPLIT_K_DEPTH for c in found if c.split_k > 1)


def test_plan_is_bounded():
    plan = moe_tune.plan(moe_tune.tune_shapes(SHAPES, list(SHAPES), [1, 2, 4]), SMEM)
    assert plan["shapes"] == 6 and plan["estimate_s"] < 420, plan


def test_written_table_is_what_moe_configs_reads(tmp_path):
    configs = tuple(default_configs(bucket, 128, 2048, 384, 2, SMEM) for bucket in range(len(TOKEN_BUCKETS) + 1))
    path = moe_tune.write_table(str(tmp_path), "NVIDIA H200", [dict(key=(128, 2048, 384, 8), configs=configs)],
                                dict(date="today"))
    assert path == str(tmp_path / "moe_tuned" / "NVIDIA_H200.json")
    with open(path) as f:
        table = MoeConfigTable.from_json(json.load(f))
    assert table.device == "NVIDIA H200" and table.token_buckets == TOKEN_BUCKETS
    assert table.entries == {(128, 2048, 384, 8): configs}
    other = {(8, 4096, 14336, 2): configs, (128, 2048, 384, 8): configs[::-1]}
    path = moe_tune.write_table(str(tmp_path), "NVIDIA H200", [dict(key=(128, 2048, 384, 8), configs=configs)],
                                dict(date="today"), installed=MoeConfigTable("NVIDIA H200", TOKEN_BUCKETS, other))
    with open(path) as f:
        data = json.load(f)
    assert MoeConfigTable.from_json(data).entries == {(128, 2048, 384, 8): configs, (8, 4096, 14336, 2): configs}
    assert data["meta"]["kept"] == [[8, 4096, 14336, 2]]
    assert moe_tune.bucket_token_counts(0, 8) == [1, 2] and moe_tune.bucket_token_counts(4, 2) == [2049, 4096]
