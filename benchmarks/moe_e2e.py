"""``bench_moe.py --e2e``: decode ms/step of a Qwen3-30B-A3B-shaped model with 8 of its 48 layers, beside the bytes
each step must read and the time reading them at the copy bandwidth takes (the roofline).

The checkpoint (random bf16 weights, ~11 GB: 8 layers of 128 experts of 3 x 2048 x 768, attention, untied
151,936-token embedding and LM head) is written by ``latency.write_checkpoint``: names and shapes from a
meta-device Hugging Face model (transformers 5 holds the experts stacked, ``mlp.experts.gate_up_proj``
(E, 2I, H), so they are saved that way), every tensor drawn on the GPU and saved shard by shard (~4 GB each): the
host holds at most one shard (and safetensors' serialised copy of it), never the model. The loader reads the stacked
experts expert by expert through safetensors slices. The peak host RSS of the process is reported beside the
checkpoint's size as evidence (it counts the touched pages of the memory-mapped shard being read too, which are
page cache, not a copy); the checkpoint is deleted at the end.

Engine: CUDA graphs (the default), no prefix caching; per batch size (1 and 64) ``latency.decode_batch``: B random
128-token prompts prefilled, then 3 warm-up and 32 timed decode steps, median ms/step, and the GPU time of one
replay of the step's graph. Bytes a decode step must read (``step_bytes``): attention weights (q, k, v, o), router
weights, the LM head, the experts expected to be hit under uniform routing per layer (E x (1 - (1 - k/E)^B) of them,
each 3 x H x I weights) and the KV cache of the batch's mean context; norms and the B embedding rows are left out.
"""
import os
import random
import resource
import shutil
import time
import types

import torch

EXPERT_MATRICES = 3  # gate, up, down


def step_bytes(spec: dict, batch: int, mean_context: float, element_size: int) -> dict:
    """The bytes one decode step of ``batch`` sequences must read, by part (see the module docstring)."""
    hidden, layers, heads, kv_heads, head_dim, num_experts, top_k = (spec[key] for key in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts",
        "num_experts_per_tok"))
    experts_hit = num_experts * (1 - (1 - top_k / num_experts) ** batch)
    parts = dict(
        attention=layers * hidden * head_dim * (2 * heads + 2 * kv_heads) * element_size,
        router=layers * num_experts * hidden * element_size,
        lm_head=spec["vocab_size"] * hidden * element_size,
        experts=layers * experts_hit * EXPERT_MATRICES * hidden * spec["moe_intermediate_size"] * element_size,
        kv=batch * mean_context * layers * 2 * kv_heads * head_dim * element_size)
    return dict(parts, total=sum(parts.values()), experts_hit_per_layer=experts_hit)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_e2e(work_dir: str, spec: dict, copy_tbs: float, dtype: torch.dtype, device: str,
            batches=(1, 64), decode_steps: int = 32) -> dict:
    """Write the checkpoint into ``work_dir``, time decode at each batch size, delete the checkpoint."""
    from flashserve import LLM
    from latency import decode_batch, write_checkpoint

    directory = os.path.join(work_dir, f"qwen3-moe-{spec['num_hidden_layers']}-layers")
    try:
        info = write_checkpoint(directory, "Qwen3MoeForCausalLM", spec, dtype, device)
        info["peak_rss_after_write_bytes"] = peak_rss_bytes()
        print(f"  checkpoint: {info['bytes'] / 1e9:.2f} GB in {info['write_s']:.1f} s, peak host RSS "
              f"{info['peak_rss_after_write_bytes'] / 1e9:.2f} GB")
        start = time.perf_counter()
        llm = LLM(directory, dtype=dtype, device=device, max_model_len=4096, max_num_seqs=max(batches),
                  enable_prefix_caching=False)
        info["engine_start_s"] = time.perf_counter() - start
        info["peak_rss_after_load_bytes"] = peak_rss_bytes()
        print(f"  engine started in {info['engine_start_s']:.1f} s, peak host RSS "
              f"{info['peak_rss_after_load_bytes'] / 1e9:.2f} GB")
        run = types.SimpleNamespace(args=types.SimpleNamespace(prompt_len=128, decode_steps=decode_steps),
                                    rng=random.Random(0), cuda=device == "cuda")
        element_size = torch.empty((), dtype=dtype).element_size()
        rows = []
        try:
            for batch in batches:
                measured = decode_batch(run, llm.engine, batch)
                needed = step_bytes(spec, batch, measured["mean_context"], element_size)
                roofline_ms = needed["total"] / copy_tbs / 1e9
                rows.append(dict(batch=batch, ms=measured["ms"], graph_gpu_ms=measured.get("graph_gpu_ms"),
                                 tok_per_s=measured["tok_per_s"], mean_context=measured["mean_context"],
                                 step_bytes=needed, roofline_ms=roofline_ms))
                print(f"  B={batch}: {measured['ms']:.2f} ms/step (graph GPU {measured.get('graph_gpu_ms') or 0:.2f}"
                      f" ms); reads {needed['total'] / 1e9:.2f} GB: roofline {roofline_ms:.2f} ms "
                      f"({100 * roofline_ms / measured['ms']:.0f}% of it)")
        finally:
            llm.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return dict(checkpoint=info, rows=rows)


def markdown(result: dict) -> str:
    import common

    def gb(value: float) -> str:
        return f"{value / 1e9:.3f}"

    info = result["checkpoint"]
    header = (f"Checkpoint {gb(info['bytes'])} GB written in {info['write_s']:.1f} s ({info['shards']} shards), "
              f"engine start {info['engine_start_s']:.1f} s, peak host RSS {gb(info['peak_rss_after_load_bytes'])} "
              "GB.\n\n")
    table = common.markdown_table(
        ["batch", "ms/step", "graph GPU ms", "experts hit / layer (expected)", "GB: attention + router + LM head",
         "GB: experts", "GB: KV", "GB / step", "roofline ms", "roofline / measured"],
        [[r["batch"], f"{r['ms']:.2f}", f"{r['graph_gpu_ms'] or float('nan'):.2f}",
          f"{r['step_bytes']['experts_hit_per_layer']:.1f}",
          gb(r["step_bytes"]["attention"] + r["step_bytes"]["router"] + r["step_bytes"]["lm_head"]),
          gb(r["step_bytes"]["experts"]), gb(r["step_bytes"]["kv"]), gb(r["step_bytes"]["total"]),
          f"{r['roofline_ms']:.2f}", f"{100 * r['roofline_ms'] / r['ms']:.0f}%"] for r in result["rows"]])
    return header + table + "\n"
