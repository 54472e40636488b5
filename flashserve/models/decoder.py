"""One decoder-only transformer for Llama 2/3/3.1/3.2, Qwen2/2.5, Qwen3, Mistral and the mixture-of-experts
Qwen2-MoE, Qwen3-MoE and Mixtral.

The architectures differ only in data carried by ``ModelSpec`` (q/k/v and output biases, per-head q/k RMSNorm,
rope scaling, sliding windows, tied embeddings, and which layers run routed experts instead of the dense MLP:
``spec.moe``, see ``moe.SparseMoeBlock``). Module names follow Hugging Face's, except that q/k/v and
gate/up are fused (``qkv_proj``, ``gate_up_proj``); ``packed_modules_mapping`` tells the loader where the HF
tensors go.

Tokens of the whole batch are packed along one dimension: ``forward(input_ids (T,), positions (T,))`` returns
hidden states (T, hidden_size); per-request boundaries live in the attention context.

The residual stream: each pre-norm layer maps it h to ``h2 = h + o_proj(attn(qkv_proj(input_layernorm(h))))``, then
``h3 = h2 + mlp(post_attention_layernorm(h2))`` (``pre_norm_block``). It is carried as ``(hidden, residual)``:
``hidden`` alone where the last block's final product added the stream in its epilogue (o_proj, down_proj on the
small-M kernel, where the next block's first product folds its norm: ``adds_residual`` and ``folds_norm``), and
then that product folds the RMSNorm into its launch (QKV, gate/up: ``rms_norm_linear``; ``norm_linear.folds``: a
resident plan always, the grid kernel while x is at most ``norm_linear.NORM_MAX_X_BYTES``, 0 by default: it was
slower on the H200); else ``hidden + residual`` with the add pending, which the next norm does (the fused add +
RMSNorm, as before the folding). No step launches more kernels than with the fused add + RMSNorm alone. With the
fold, a Qwen3-0.6B layer at batch 1 on the H200's plans (resident at one row) is six launches (normed QKV, q/k
norm + rotary + KV write, decode attention, o_proj + add, normed gate/up + SiLU-and-mul, down_proj + add; a split
decode attention adds its combine) instead of eight; without, the two norms run as their own kernels, each fused
with the pending add. The final norm (``model.norm``)
runs alone, or fused with a pending add. A MoE block takes the residual where its fused-MoE
sum launch can add it (``SparseMoeBlock.adds_residual``), else leaves it pending.

Under tensor parallelism (``flashserve.distributed``) the projections are split over the ranks (Megatron's
column / row split) and each rank's attention runs its own query and KV heads; with one rank the parallel layers
are the plain ones.
"""
import functools

import torch
from torch import nn

from flashserve.distributed import layers as parallel  # a module, not its names: it imports models.layers
from flashserve.kernels import linear_silu_and_mul, norm_linear, rms_norm_linear_silu_and_mul
from flashserve.models.attention import Attention
from flashserve.models.layers import RMSNorm, RotaryEmbedding
from flashserve.models.moe import SparseMoeBlock
from flashserve.models.spec import ModelSpec


class SelfAttention(nn.Module):
    """Fused QKV projection, then (in ``Attention``) optional per-head q/k RMSNorm, rotary and paged attention, then
    the output projection. ``num_heads``/``num_kv_heads`` are this rank's heads.

    ``forward(positions, x, norm, residual)``: ``residual + o_proj(attn(qkv_proj(norm(x))))`` (x (T, hidden); the
    norm folded into the QKV product, the residual added by the output projection; either may be None)."""

    def __init__(self, spec: ModelSpec, rotary: RotaryEmbedding, sliding_window: int | None):
        super().__init__()
        self.qkv_proj = parallel.QKVParallelLinear(spec.hidden_size, spec.head_dim, spec.num_heads,
                                                   spec.num_kv_heads, spec.attention_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_local_heads, self.qkv_proj.num_local_kv_heads
        self.head_dim = spec.head_dim
        self.split_sizes = self.qkv_proj.output_sizes
        self.o_proj = parallel.RowParallelLinear(spec.num_heads * spec.head_dim, spec.hidden_size, spec.o_bias,
                                                 "num_attention_heads * head_dim")
        self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.attn = Attention(self.num_heads, self.num_kv_heads, spec.head_dim, spec.head_dim ** -0.5, rotary,
                              sliding_window)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, norm: RMSNorm | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden, norm).split(self.split_sizes, dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        out = self.attn(positions, q, k, v, self.q_norm, self.k_norm)
        return self.o_proj(out.reshape(num_tokens, -1), residual=residual)

    def adds_residual(self, num_tokens: int) -> bool:
        """Whether ``forward``'s residual add can be part of the output projection's launch at ``num_tokens``."""
        return self.o_proj.adds_residual(num_tokens)

    def folds_norm(self, num_tokens: int) -> bool:
        """Whether ``forward``'s norm is part of the QKV projection's launch at ``num_tokens``."""
        return self.qkv_proj.folds_norm(num_tokens)


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))`` with gate and up fused into one product whose epilogue
    applies the SiLU-and-mul; of ``spec.intermediate_size`` unless ``intermediate_size`` is given (a shared
    expert's). Under tensor parallelism ``reduce_results=False`` returns this rank's partial sum (the MoE block
    all-reduces it together with the routed experts').

    ``forward(x, norm, residual)``: ``residual + down(silu(gate(norm(x))) * up(norm(x)))``, the norm folded into the
    gate/up product, the residual added by the down projection; the shared expert passes neither."""

    def __init__(self, spec: ModelSpec, intermediate_size: int | None = None, reduce_results: bool = True):
        super().__init__()
        intermediate_size = intermediate_size or spec.intermediate_size
        self.gate_up_proj = parallel.MergedColumnParallelLinear(spec.hidden_size, [intermediate_size] * 2, (0, 1),
                                                                spec.mlp_bias, names=("intermediate_size",) * 2)
        self.down_proj = parallel.RowParallelLinear(intermediate_size, spec.hidden_size, spec.mlp_bias,
                                                    "intermediate_size", reduce_results)

    def forward(self, x: torch.Tensor, norm: RMSNorm | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        weight, bias = self.gate_up_proj.weight, self.gate_up_proj.bias
        if norm is None:
            activated = linear_silu_and_mul(x, weight, bias)
        else:
            activated = rms_norm_linear_silu_and_mul(x, norm.weight, norm.eps, weight, bias)
        return self.down_proj(activated, residual=residual)

    def adds_residual(self, num_tokens: int) -> bool:
        """Whether ``forward``'s residual add can be part of the down projection's launch at ``num_tokens``."""
        return self.down_proj.adds_residual(num_tokens)

    def folds_norm(self, num_tokens: int) -> bool:
        """Whether ``forward``'s norm is part of the gate/up product's launch at ``num_tokens``."""
        return norm_linear.folds(num_tokens, self.gate_up_proj.weight, self.gate_up_proj.bias, True)


def pre_norm_block(block, adds_residual: bool, norm: RMSNorm, hidden: torch.Tensor,
                   residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``stream + block(norm(stream))`` for the residual stream ``hidden + residual`` (``residual`` None: ``hidden``
    is the stream), returned in the same form. ``block(x, norm, residual)`` computes ``residual + f(norm(x))``, with
    ``norm`` and ``residual`` optional.

    A pending add is done first, by the fused add + RMSNorm (``residual`` becomes the stream, in place); otherwise
    the norm goes to the block, whose first product folds it where the kernel allows. Where ``adds_residual`` (the
    block's last product adds within its launch) the block adds the stream: (new stream, None); else the add is
    left pending: (block output, stream)."""
    if residual is None:
        x, stream, block_norm = hidden, hidden, norm
    else:
        x, stream = norm(hidden, residual)
        block_norm = None
    if adds_residual:
        return block(x, block_norm, stream), None
    return block(x, block_norm), stream


class DecoderLayer(nn.Module):
    """Pre-norm layer: ``forward(positions, hidden, residual)`` maps the residual stream ``hidden + residual``
    (``residual`` None: ``hidden`` alone; (T, hidden) each) to the stream after the layer, in the same form (module
    docstring)."""

    def __init__(self, spec: ModelSpec, rotary: RotaryEmbedding, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = SelfAttention(spec, rotary, spec.sliding_windows[layer_index])
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        sparse = spec.moe is not None and spec.moe.sparse_layers[layer_index]
        self.mlp = SparseMoeBlock(spec, MLP) if sparse else MLP(spec)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        num_tokens = hidden.shape[0]
        # A dense product's epilogue add pays only where the next product folds its norm (else the next fused add +
        # RMSNorm takes it in a launch that runs anyway); the next layer's attention has this one's shapes. The
        # fused-MoE sum takes it for free.
        attn_adds = self.self_attn.adds_residual(num_tokens) and self.mlp.folds_norm(num_tokens)
        mlp_adds = self.mlp.adds_residual(num_tokens) and (
            isinstance(self.mlp, SparseMoeBlock) or self.self_attn.folds_norm(num_tokens))
        hidden, residual = pre_norm_block(functools.partial(self.self_attn, positions), attn_adds,
                                          self.input_layernorm, hidden, residual)
        return pre_norm_block(self.mlp, mlp_adds, self.post_attention_layernorm, hidden, residual)


class DecoderModel(nn.Module):
    """Embedding, the decoder layers and the final norm (Hugging Face's ``model.*`` tensors)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        rotary = RotaryEmbedding(spec.head_dim, spec.max_position_embeddings, spec.rope_theta, spec.rope_scaling)
        self.embed_tokens = parallel.VocabParallelEmbedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, rotary, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None  # the residual stream, hidden + residual
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        return self.norm(hidden) if residual is None else self.norm(hidden, residual)[0]


class DecoderForCausalLM(nn.Module):
    """The whole model: ``forward`` gives hidden states, ``compute_logits`` the float32 logits of chosen rows."""

    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.model = DecoderModel(spec)
        self.lm_head = parallel.ParallelLMHead(spec.vocab_size, spec.hidden_size,
                                               self.model.embed_tokens if spec.tie_word_embeddings else None)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: (T,) int64 packed over the batch -> hidden (T, hidden_size)."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (N, hidden_size) -> logits (N, vocab_size) float32."""
        return self.lm_head(hidden)

    def attention_layers(self) -> list[Attention]:
        """The attention module of every layer, in layer order (the runner gives each its KV cache)."""
        return [layer.self_attn.attn for layer in self.model.layers]
