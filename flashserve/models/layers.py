"""The building blocks of the decoder: linear layers that load fused weights, RMSNorm, rotary embedding, the
vocabulary embedding and the LM head (the SwiGLU activation is ``flashserve.kernels.silu_and_mul``).

Parameters are created with ``torch.empty`` (no initialisation: the loader fills every one). Each parameter has a
``weight_loader(param, loaded_weight, shard_id=None)`` attribute; fused parameters (QKV, gate/up) take a
``shard_id`` naming which Hugging Face tensor is being placed.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from flashserve.kernels import (apply_rotary, fused_add_rms_norm, linear, norm_linear, rms_norm, rms_norm_linear,
                                skinny_gemm)


def copy_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
    """Copy a checkpoint tensor into ``param``; ValueError when the shapes differ."""
    if tuple(loaded_weight.shape) != tuple(param.shape):
        raise ValueError(f"weight of shape {tuple(loaded_weight.shape)} does not fit parameter of shape "
                         f"{tuple(param.shape)}")
    param.data.copy_(loaded_weight)


def _parameter(*shape: int) -> nn.Parameter:
    param = nn.Parameter(torch.empty(*shape), requires_grad=False)
    param.weight_loader = copy_weight_loader
    return param


class Linear(nn.Module):
    """``y = x @ weight.T + bias`` with weight (out_features, in_features), as Hugging Face stores it (small batches
    run ``flashserve.kernels.linear``'s bandwidth-bound kernel).

    ``forward(x, norm, residual)`` computes ``norm(x) @ weight.T + bias + residual``: ``norm`` an ``RMSNorm`` folded
    into the product's prologue (``flashserve.kernels.rms_norm_linear``), ``residual`` (..., out_features) added in
    its epilogue (the pre-norm residual stream), where the kernel runs; else the same operations unfused.
    ``adds_residual(num_rows)``: whether the add can ride in the product's launch (the kernel runs at that many
    rows); ``folds_norm(num_rows)``: whether the norm does (``norm_linear.folds``). The decoder hands a product
    the add only where the next product folds its norm: otherwise the next fused add + RMSNorm does the add, and
    the epilogue add made the B1 decode step slower on the H200 (Qwen3-0.6B 1.084 against 1.067 ms, Llama-3.1-8B
    4.560 against 4.544; 2026-12-02)."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.weight = _parameter(out_features, in_features)
        self.bias = _parameter(out_features) if bias else None

    def forward(self, x: torch.Tensor, norm: "RMSNorm | None" = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        if norm is None:
            return linear(x, self.weight, self.bias, residual)
        return rms_norm_linear(x, norm.weight, norm.eps, self.weight, self.bias, residual)

    def adds_residual(self, num_rows: int) -> bool:
        return skinny_gemm.plan(num_rows, self.weight, self.bias, False) is not None

    def folds_norm(self, num_rows: int) -> bool:
        return norm_linear.folds(num_rows, self.weight, self.bias, False)


class MergedLinear(Linear):
    """Several linear layers of the same input run as one matmul (QKV, gate/up): their outputs are concatenated.

    ``shard_ids`` names the parts in order (e.g. ("q", "k", "v")); the weight loader places a checkpoint tensor
    of part ``shard_id`` at that part's rows of the fused weight (and bias).
    """

    def __init__(self, in_features: int, output_sizes: list[int], shard_ids: tuple, bias: bool):
        super().__init__(in_features, sum(output_sizes), bias)
        self.output_sizes = list(output_sizes)
        self.shard_ids = tuple(shard_ids)
        self.weight.weight_loader = self._load_shard
        if self.bias is not None:
            self.bias.weight_loader = self._load_shard

    def _load_shard(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id) -> None:
        if shard_id not in self.shard_ids:
            raise ValueError(f"shard_id must be one of {self.shard_ids}, got {shard_id!r}")
        index = self.shard_ids.index(shard_id)
        offset = sum(self.output_sizes[:index])
        copy_weight_loader(param.data.narrow(0, offset, self.output_sizes[index]), loaded_weight)


class RMSNorm(nn.Module):
    """Hugging Face's RMSNorm (fp32 statistics, rounded to the input dtype, times the weight).

    ``forward(x)`` returns the normalised x; ``forward(x, residual)`` first adds x into ``residual`` in place
    (the pre-norm residual stream) and returns ``(rms_norm(residual), residual)``. The decoder may also hand it to
    the next product (``Linear.forward``'s ``norm``), which folds it into its prologue.
    """

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = _parameter(hidden_size)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return fused_add_rms_norm(x, residual, self.weight, self.eps), residual


def rotary_inverse_frequencies(head_dim: int, rope_theta: float, rope_scaling: dict | None) -> torch.Tensor:
    """(head_dim / 2,) fp32 inverse frequencies, computed exactly as transformers does for the rope types
    "default", "linear" (frequencies divided by ``factor``) and "llama3" (Llama 3.1's wavelength-dependent
    scaling with smooth interpolation between ``low_freq_factor`` and ``high_freq_factor``)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (rope_theta ** exponents)
    if rope_scaling is None:
        return inv_freq
    factor = rope_scaling["factor"]
    if rope_scaling["rope_type"] == "linear":
        return inv_freq / factor
    low_freq_factor = rope_scaling["low_freq_factor"]
    high_freq_factor = rope_scaling["high_freq_factor"]
    old_context_len = rope_scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding in the GPT-NeoX layout (the two halves of each head pair up), as in HF Llama.

    Holds ``cos_sin_cache`` (max_positions, head_dim) fp32: cos of ``position * inv_freq`` in the first half of
    the columns, sin in the second (computed as HF computes them at run time, so fp32 results are identical).
    """

    def __init__(self, head_dim: int, max_positions: int, rope_theta: float, rope_scaling: dict | None):
        super().__init__()
        inv_freq = rotary_inverse_frequencies(head_dim, rope_theta, rope_scaling)
        freqs = torch.arange(max_positions, dtype=torch.float32).unsqueeze(1) * inv_freq.unsqueeze(0)
        self.register_buffer("cos_sin_cache", torch.cat((freqs.cos(), freqs.sin()), dim=-1), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q (T, H, D) and k (T, Hk, D) in place at ``positions`` (T,); returns them."""
        return apply_rotary(q, k, self.cos_sin_cache, positions, is_neox=True)


class VocabEmbedding(nn.Module):
    """Token embedding: (T,) ids -> (T, hidden_size)."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.weight = _parameter(vocab_size, hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """(N, hidden_size) -> (N, vocab_size) float32 logits. With tied embeddings it shares the embedding's weight."""

    def __init__(self, vocab_size: int, hidden_size: int, tied_embedding: VocabEmbedding | None = None):
        super().__init__()
        self.weight = tied_embedding.weight if tied_embedding is not None else _parameter(vocab_size, hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.weight).float()
