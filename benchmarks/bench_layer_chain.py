"""Benchmark: a decode step's chain of small-M products, grid-kernel plans against resident ones (GPU).

What a decode step's layers do with their products at batch 1, without the attention: per layer RMSNorm, the QKV
product, the output projection with the residual add, RMSNorm, the gate/up product with SiLU-and-mul, the down
projection with the residual add, each reading the previous one's output (real data dependencies), for
``--layers`` Qwen3-0.6B-shaped layers (their weights, ~31 MB a layer, never all in L2), replayed from one CUDA
graph: µs per chain, median (``common.graph_us``). The products launch with programmatic dependent launch where
the GPU has it, as in the engine.

Plans compared (``skinny_gemm.launch`` with explicit configs, so the table in use does not matter):
- "grid": the grid kernel's configs that session 8's table held at M 1 (qkv n64k128, o n32k256 split 4, gate/up
  n32k256, down n32k256 split 4), norms as their own kernels;
- "resident": ``skinny_gemm_resident`` configs (the table's M 1 plans since session 11), norms as their own
  kernels; "resident, norms folded": the same with the RMSNorms inside the QKV and gate/up launches (what the
  decoder does with resident plans);
- "only <proj> resident": one projection resident, the others on the grid configs — a resident kernel starts
  early only after a predecessor that passed its own wait early, so the gains need neighbours;
- "products only": the two main plans without the norms.
Anchor of the same run: the chain's weight bytes at the HBM copy bandwidth (its floor). The first layer's output
of every plan is checked against the grid plan's (bf16 rounding order only).
Usage: python benchmarks/bench_layer_chain.py [--out DIR] [--layers 28] [--rows 1]
"""
import torch

import common
from flashserve.kernels import norm, skinny_gemm
from flashserve.kernels.skinny_gemm_plans import GemmConfig

HIDDEN, Q_SIZE, KV_SIZE, INTERMEDIATE, EPS = 1024, 2048, 1024, 3072, 1e-6
SHAPES = {"qkv": (Q_SIZE + 2 * KV_SIZE, HIDDEN, False), "o": (HIDDEN, Q_SIZE, False),
          "gate_up": (2 * INTERMEDIATE, HIDDEN, True), "down": (HIDDEN, INTERMEDIATE, False)}
GRID = {"qkv": GemmConfig(64, 128, 1, 4, 4), "o": GemmConfig(32, 256, 4, 4, 4),
        "gate_up": GemmConfig(32, 256, 1, 4, 4), "down": GemmConfig(32, 256, 4, 4, 4)}
RESIDENT = {"qkv": GemmConfig(16, 0, 1, 4, 1, False, 0, False, True),
            "o": GemmConfig(8, 0, 1, 4, 1, False, 0, False, True),
            "gate_up": GemmConfig(16, 0, 1, 8, 1, False, 0, False, True),
            "down": GemmConfig(8, 0, 1, 8, 1, False, 0, False, True)}


def make_layers(count: int) -> list[dict]:
    """Random bf16 weights (N(0, 0.02)) and norm weights (1 + U(-0.5, 0.5)) of ``count`` layers."""
    def norm_weight():
        return torch.rand(HIDDEN, device="cuda", dtype=torch.bfloat16) + 0.5
    return [dict(norm_1=norm_weight(), norm_2=norm_weight(),
                 **{name: torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
                    for name, (n, k, _) in SHAPES.items()}) for _ in range(count)]


def chain(layers, hidden, configs: dict, norms: str):
    """The chain's function: ``norms`` "separate" (rms_norm kernels), "folded" (inside QKV and gate/up) or "none"."""
    def product(name, x, weight, residual=None, norm_weight=None):
        return skinny_gemm.launch(x, weight, None, residual, SHAPES[name][2], configs[name], norm_weight,
                                  EPS if norm_weight is not None else 0.0)

    def run():
        h = hidden
        for layer in layers:
            for first, second, norm_weight in (("qkv", "o", layer["norm_1"]), ("gate_up", "down", layer["norm_2"])):
                if norms == "separate":
                    x = product(first, norm.rms_norm(h, norm_weight, EPS), layer[first])
                elif norms == "folded":
                    x = product(first, h, layer[first], norm_weight=norm_weight)
                else:
                    x = product(first, h, layer[first])
                if first == "qkv":
                    x = x[:, :Q_SIZE]  # the attention's output stands in: the q columns
                h = product(second, x, layer[second], residual=h)
        return h
    return run


def main():
    parser = common.argument_parser(__doc__)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--rows", type=int, default=1, help="tokens in the batch (the resident FMA path: <= 8)")
    args = parser.parse_args()
    env = common.environment()
    copy_tbs = common.copy_bandwidth_tbs()
    layers = make_layers(args.layers)
    hidden = torch.randn(args.rows, HIDDEN, device="cuda", dtype=torch.bfloat16)
    weight_bytes = sum(w.numel() * w.element_size() for layer in layers for w in layer.values())
    plans = [("grid", GRID, "separate"), ("resident", RESIDENT, "separate"),
             ("resident, norms folded", RESIDENT, "folded")]
    plans += [(f"only {name} resident", dict(GRID, **{name: RESIDENT[name]}), "separate") for name in SHAPES]
    plans += [("grid, products only", GRID, "none"), ("resident, products only", RESIDENT, "none")]
    reference = chain(layers[:1], hidden, GRID, "separate")().float()
    rows = []
    for label, configs, norms in plans:
        first_layer = chain(layers[:1], hidden, configs, norms)().float()
        us = common.graph_us(chain(layers, hidden, configs, norms), 10, 100)
        rows.append(dict(plan=label, us=us, us_per_layer=us / args.layers,
                         first_layer_max_diff=(first_layer - reference).abs().max().item()))
        print(f"  {label}: {us:.1f} µs", flush=True)
    floor_us = weight_bytes / copy_tbs / 1e6
    grid_us = rows[0]["us"]
    text = common.section_header(f"Decode-step product chain, {args.layers} Qwen3-0.6B layers, M {args.rows}", env)
    text += (f"HBM copy bandwidth: {copy_tbs:.2f} TB/s; weights {weight_bytes / 1e6:.0f} MB -> floor "
             f"{floor_us:.1f} µs\n\n")
    text += common.markdown_table(
        ["plan", "µs per chain", "µs per layer", "vs grid", "floor / chain", "first layer max diff vs grid"],
        [[r["plan"], f"{r['us']:.1f}", f"{r['us_per_layer']:.2f}", f"{r['us'] / grid_us:.2f}",
          f"{floor_us / r['us']:.0%}", f"{r['first_layer_max_diff']:.3g}"] for r in rows])
    common.write_results(args.out, "bench_layer_chain", text,
                         dict(meta=env, copy_tbs=copy_tbs, weight_bytes=weight_bytes, floor_us=floor_us, rows=rows))


if __name__ == "__main__":
    main()
