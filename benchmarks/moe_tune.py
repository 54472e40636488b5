"""``bench_moe.py --tune``: sweep the fused-MoE GEMMs' launch configurations and write the table moe_configs reads.

Shapes: each model of ``--shapes`` at every ``--tune-tp`` size (its experts' intermediate size divided by the
size: what each tensor-parallel rank runs), keyed as ``moe_configs`` looks them up. Per shape and token bucket of
``moe_configs.TOKEN_BUCKETS``, the gate/up and the down GEMM are timed alone, from a CUDA graph (median of
replays, L2 flushed between them), at the bucket's smallest and largest token count (4096 at most), for every
candidate of ``candidates``. A candidate's score is its time over the best time at that token count, summed over
the counts (each count weighs the same); per BLOCK_M the best-scoring gate/up and down configs are paired (one
token permutation serves both GEMMs) and the BLOCK_M with the smallest summed time of the pair wins.

Candidates (``candidates``): the heuristic default (``default_configs``) and the tiles worth trying for the rows an
expert gets in that bucket. At most 8 rows per expert on average: 16-row tiles streaming the weights (narrow
column tiles, deep K steps, 2-4 stages; for the down GEMM also split-K with 64-wide tiles where each share keeps
K >= 2048). More rows: the two BLOCK_M of 16...128 nearest below the largest mean rows per expert, with
tensor-core-sized tiles (BLOCK_K 64 or 128, 3-4 stages; 4 warps up to 32 rows, 4 and 8 for 64, 8 for 128).
Candidates that cannot fit (pipeline over the GPU's shared memory, over 128 fp32 accumulators per thread) are
dropped before compiling; one that fails to compile or launch is skipped. Every unsplit down candidate is also
timed with ``pair_outputs``, each down candidate with what its output mode adds (the cleared fp32 rows and the
final rounding, or the per-token sum).

Output: ``DIR/moe_tuned/<GPU name>.json`` (copy it to ``flashserve/kernels/moe_tuned/``), the chosen pairs and
their speed-up over the heuristic default per cell in the markdown. ``plan`` prints the number of compiles and
timings and an estimate of the time before the sweep starts.
"""
import json
import math
import os
from dataclasses import replace

import torch

from flashserve.kernels import moe as kernel
from flashserve.kernels.moe_configs import (MIN_SPLIT_K_DEPTH, TOKEN_BUCKETS, MoeConfigTable, MoeGemmConfig,
                                            default_configs, table_path)
from flashserve.kernels.reference import moe as reference
from flashserve.kernels.skinny_gemm_plans import pipeline_bytes, shared_memory_bytes

MAX_TUNE_TOKENS = 4096
COMPILE_S, TIMING_S = 1.5, 0.03  # rough H200 costs of one compile and one graph timing (for the estimate)
MAX_ACCUMULATORS_PER_THREAD = 128
H200_SHARED_MEMORY = 232_448  # per program (opt-in): what the CPU smoke run prunes with


def device_shared_memory() -> int:
    return shared_memory_bytes(torch.cuda.current_device())


def bucket_token_counts(bucket: int, top_k: int, max_tokens: int = MAX_TUNE_TOKENS) -> list[int]:
    """The token counts a bucket is timed at: its smallest and largest (at most ``max_tokens``)."""
    bounds = (0, *TOKEN_BUCKETS, 8 * TOKEN_BUCKETS[-1])
    low = max(1, bounds[bucket] // top_k + 1)
    high = min(max_tokens, max(1, bounds[bucket + 1] // top_k))
    return sorted({min(low, high), high})


def _fits(config: MoeGemmConfig, gated: bool, smem: int) -> bool:
    accumulators = config.block_m * config.block_n * (2 if gated else 1) / (32 * config.num_warps)
    return (pipeline_bytes(config.block_m, config.block_n, config.block_k, config.num_stages, gated, 2) <= smem
            and accumulators <= MAX_ACCUMULATORS_PER_THREAD)


def candidates(shape, bucket: int, gated: bool, smem: int) -> list[MoeGemmConfig]:
    """The configs timed for one GEMM of a shape (hidden, experts, top_k, this rank's intermediate) and bucket."""
    hidden, num_experts, top_k, intermediate = shape
    rows = max(bucket_token_counts(bucket, top_k)) * top_k / num_experts  # mean rows per expert, largest count
    default = default_configs(bucket, num_experts, hidden, intermediate, 2, smem)[0 if gated else 1]
    found = [default]
    if rows <= 8:
        if gated:
            tiles = [(16, 128), (16, 256), (32, 128), (32, 256), (64, 64), (64, 128)]
            options = [(n, k, 4, stages, 1) for n, k in tiles for stages in (2, 3, 4)]
        else:
            splits = [s for s in (2, 4) if intermediate // s >= MIN_SPLIT_K_DEPTH]
            options = [(n, k, 4, stages, 1) for n in (64, 128) for k in (128, 256) for stages in (2, 3, 4)]
            options += [(64, k, 4, stages, split) for split in splits for k in (128, 256) for stages in (3, 4)]
        found += [MoeGemmConfig(16, *option) for option in options]
    else:
        block_ms = [m for m in (16, 32, 64, 128) if m <= max(16, rows)][-2:]
        block_ns = (64, 128) if gated else (64, 128, 256)
        block_ks = (64, 128)  # 128: half the K steps of the short down GEMMs (K = 768 / tp), where it fits
        for m in block_ms:
            warp_counts = {16: (4,), 32: (4,), 64: (4, 8), 128: (8,)}[m]
            found += [MoeGemmConfig(m, n, k, warps, stages) for n in block_ns for k in block_ks
                      for warps in warp_counts for stages in (3, 4)]
    if not gated:  # each unsplit down config also with per-pair outputs summed by a third launch
        found += [replace(config, pair_outputs=True) for config in found if config.split_k == 1]
    unique = list(dict.fromkeys(found))
    return [config for config in unique if config == default or _fits(config, gated, smem)]


def tune_shapes(shapes: dict, names: list[str], tp_sizes: list[int]) -> list[tuple[str, tuple]]:
    """(label, (hidden, experts, top_k, intermediate / tp)) per model and tensor-parallel size that divides it."""
    found = []
    for name in names:
        hidden, num_experts, top_k, intermediate = shapes[name]
        found += [(name if tp == 1 else f"{name}/tp{tp}", (hidden, num_experts, top_k, intermediate // tp))
                  for tp in tp_sizes if intermediate % tp == 0]
    return found


def plan(tuned: list[tuple[str, tuple]], smem: int) -> dict:
    """Counts of the sweep: distinct kernels to compile, graph timings, and the estimated seconds."""
    kernels, timings = set(), 0
    for _, shape in tuned:
        for bucket in range(len(TOKEN_BUCKETS) + 1):
            counts = len(bucket_token_counts(bucket, shape[2]))
            for gated in (True, False):
                configs = candidates(shape, bucket, gated, smem)
                kernels.update((config, gated) for config in configs)
                timings += counts * len(configs)
    return dict(shapes=len(tuned), buckets=len(TOKEN_BUCKETS) + 1, compiles=len(kernels), timings=timings,
                estimate_s=len(kernels) * COMPILE_S + timings * TIMING_S)


def _time(run, graph_us) -> float:
    try:
        run()
    except Exception as error:  # noqa: BLE001 - a tile that does not fit (shared memory, registers) is skipped
        print(f"    skip: {str(error).splitlines()[0][:100]}")
        return math.inf
    us = graph_us(run, warmup_ms=3, rep_ms=15)
    return math.inf if math.isnan(us) else us  # a capture that failed never wins


def _bucket_times(shape, counts, configs, gated, tensors, inputs, graph_us) -> dict:
    """{config: [µs per token count]} for one GEMM."""
    hidden, num_experts, top_k, intermediate = shape
    x, w13, w2 = tensors
    device = x.device
    times = {}
    for config in configs:
        row = []
        for num_tokens in counts:
            weights, ids = inputs[num_tokens]
            alignment = kernel.moe_align_block_size(ids, config.block_m, num_experts)
            activated = torch.randn(num_tokens * top_k, intermediate, device=device, dtype=x.dtype)
            if gated:
                def run(t=num_tokens, c=config, al=alignment, act=activated, w=weights):
                    kernel._launch(x[:t], w13, act, w, top_k, True, c, al)
            else:  # with what its output mode adds: the cleared fp32 rows and the rounding, or the pair sum
                def run(c=config, al=alignment, act=activated, w=weights):
                    kernel.down_projection(act, w2, w, top_k, c, al, x.dtype)
            row.append(_time(run, graph_us))
        times[config] = row
    return times


def _score(times: dict, configs) -> dict:
    """Each config's times over the best at each token count, summed."""
    best = [min(row[i] for row in times.values()) for i in range(len(next(iter(times.values()))))]
    return {config: sum(t / b for t, b in zip(times[config], best)) for config in configs}


def tune_shape(label: str, shape, smem: int, graph_us, dtype=torch.bfloat16, device="cuda",
               max_tokens: int = MAX_TUNE_TOKENS, max_candidates: int | None = None) -> dict:
    """The chosen (gate_up, down) pair per bucket of one shape, with the default's and the pair's µs
    (``max_tokens``, ``max_candidates``: smaller sweeps for the CPU smoke run)."""
    hidden, num_experts, top_k, intermediate = shape
    generator = torch.Generator(device).manual_seed(7)
    x = torch.randn(max_tokens, hidden, device=device, dtype=dtype, generator=generator)
    w13 = torch.randn(num_experts, 2 * intermediate, hidden, device=device, dtype=dtype, generator=generator) * 0.02
    w2 = torch.randn(num_experts, hidden, intermediate, device=device, dtype=dtype, generator=generator) * 0.02
    chosen, report = [], []
    for bucket in range(len(TOKEN_BUCKETS) + 1):
        counts = bucket_token_counts(bucket, top_k, max_tokens)
        inputs = {t: reference.moe_routing(torch.randn(t, num_experts, device=device, generator=generator), top_k,
                                           True) for t in counts}
        timed = {gated: _bucket_times(shape, counts, candidates(shape, bucket, gated, smem)[:max_candidates], gated,
                                      (x, w13, w2), inputs, graph_us) for gated in (True, False)}
        best_pair, best_us = None, math.inf
        for block_m in sorted({config.block_m for config in timed[True]} & {c.block_m for c in timed[False]}):
            pair = []
            for gated in (True, False):
                same_m = [config for config in timed[gated] if config.block_m == block_m]
                scores = _score(timed[gated], same_m)
                pair.append(min(same_m, key=scores.get))
            us = sum(timed[True][pair[0]]) + sum(timed[False][pair[1]])
            if us < best_us:
                best_pair, best_us = tuple(pair), us
        default = default_configs(bucket, num_experts, hidden, intermediate, 2, smem)
        if best_pair is None:  # nothing ran: keep the default
            best_pair = default
        default_us = sum(timed[True][default[0]]) + sum(timed[False][default[1]])
        up_us, down_us = sum(timed[True][best_pair[0]]), sum(timed[False][best_pair[1]])
        print(f"  {label} bucket {bucket} (T {counts}): {best_pair[0]} + {best_pair[1]}: {up_us:.1f} + "
              f"{down_us:.1f} µs, default {default_us:.1f} µs")
        chosen.append(best_pair)
        report.append(dict(bucket=bucket, tokens=counts, gate_up=best_pair[0], down=best_pair[1], us=best_us,
                           gate_up_us=up_us, down_us=down_us, default_us=default_us))
    return dict(label=label, key=(num_experts, hidden, intermediate, top_k), configs=tuple(chosen), report=report)


def write_table(out_dir: str, device_name: str, tuned: list[dict], meta: dict,
                installed: MoeConfigTable | None = None) -> str:
    """DIR/moe_tuned/<GPU name>.json in moe_configs' format (one line per bucket's pair); returns its path. The
    entries of ``installed`` (the table in use, when it has the same buckets) for shapes this sweep did not time
    are kept (``meta["kept"]`` lists them), so a sweep of some shapes updates a table rather than replacing it."""
    entries = {t["key"]: t["configs"] for t in tuned}
    if installed is not None and installed.token_buckets == TOKEN_BUCKETS:
        kept = {key: pairs for key, pairs in installed.entries.items() if key not in entries}
        meta = dict(meta, kept=[list(key) for key in kept])
        entries.update(kept)
    table = MoeConfigTable(device_name, TOKEN_BUCKETS, entries).to_json()
    entries = []
    for entry in table["entries"]:
        head = json.dumps({key: value for key, value in entry.items() if key != "configs"})[:-1]
        pairs = ",\n".join("    " + json.dumps(pair) for pair in entry["configs"])
        entries.append(f'  {head}, "configs": [\n{pairs}\n  ]}}')
    text = (f'{{"device": {json.dumps(table["device"])}, "token_buckets": {json.dumps(table["token_buckets"])},\n'
            f' "meta": {json.dumps(meta)},\n "entries": [\n' + ",\n".join(entries) + "\n]}\n")
    path = os.path.join(out_dir, "moe_tuned", os.path.basename(table_path(device_name)))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path
