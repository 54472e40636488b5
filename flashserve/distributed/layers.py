"""Tensor-parallel versions of the decoder's layers (Megatron's split, as vLLM lays it out).

Each layer holds only its rank's shard, cut from the whole checkpoint tensor by its ``weight_loader`` while the
checkpoint is read (a rank never holds the whole model); with one rank they are the plain layers of
``flashserve.models.layers``, whose forward passes (and matmul kernels) they reuse.

- ``ColumnParallelLinear``: the output features split; each rank computes its slice (no communication).
- ``MergedColumnParallelLinear``: gate/up — every part split, rank r's slices of the parts side by side.
- ``QKVParallelLinear``: query heads split; KV heads split too, or, when there are fewer KV heads than ranks, each
  rank holds the one KV head its query heads read (each KV head replicated ``tp / num_kv_heads`` times).
- ``RowParallelLinear``: the input features split (the input is the previous column-parallel output), partial
  sums all-reduced; the bias is held by rank 0 only (zeros elsewhere), so it is added once, and a residual is
  added after the all-reduce (with one rank: in the product's epilogue).
- The routed experts of MoE layers (``models.moe.StackedExperts``) split the same way along each expert's
  intermediate dimension: gate/up rows and down columns of every expert, one all-reduce per layer.
- ``VocabParallelEmbedding`` / ``ParallelLMHead``: the vocabulary padded to a multiple of ``64 * tp`` and split
  into equal row ranges; ids outside a rank's range embed to zeros and the partial embeddings are all-reduced;
  the logits of every rank's range are all-gathered and cut back to the real vocabulary.
"""
import torch
import torch.nn.functional as F
from torch import nn

from flashserve.distributed.state import all_gather_columns, all_reduce, tp_rank, tp_size
from flashserve.models.layers import LMHead, Linear, MergedLinear, VocabEmbedding, copy_weight_loader

VOCAB_PADDING = 64


def split_size(total: int, parts: int, name: str) -> int:
    """``total / parts``; ValueError naming ``name`` (a config.json field) when ``parts`` does not divide it."""
    if total % parts:
        raise ValueError(f"{name} ({total}) is not divisible by tensor_parallel_size ({parts})")
    return total // parts


def shard_of(loaded: torch.Tensor, dim: int, full: int, index: int, size: int) -> torch.Tensor:
    """Slice ``index`` (of width ``size``) of ``loaded`` along ``dim``; ValueError unless ``dim`` is ``full`` long."""
    if loaded.dim() <= dim or loaded.shape[dim] != full:
        raise ValueError(f"weight of shape {tuple(loaded.shape)} does not have {full} entries along dimension {dim}")
    return loaded.narrow(dim, index * size, size)


class ColumnParallelLinear(Linear):
    """``y[:, rank's slice] = x @ weight[rank's rows].T + bias[rank's slice]``: (T, in) -> (T, out / tp)."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        self.full_out_features = out_features
        super().__init__(in_features, split_size(out_features, tp_size(), "output features"), bias)
        for param in (self.weight, self.bias):
            if param is not None:
                param.weight_loader = self._load_rows

    def _load_rows(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        copy_weight_loader(param, shard_of(loaded, 0, self.full_out_features, tp_rank(), param.shape[0]))


class MergedColumnParallelLinear(MergedLinear):
    """Parts of the same input (gate/up, q/k/v) in one matmul, each part column-split: rank r holds slice
    ``shard_indices[i]`` of part ``i`` (width ``output_sizes[i] / num_shards[i]``)."""

    def __init__(self, in_features: int, output_sizes: list[int], shard_ids: tuple, bias: bool,
                 num_shards: list[int] | None = None, shard_indices: list[int] | None = None,
                 names: tuple[str, ...] | None = None):
        tp = tp_size()
        num_shards = num_shards or [tp] * len(output_sizes)
        names = names or tuple(f"output size of part {shard_id}" for shard_id in shard_ids)
        local = [split_size(size, parts, name) for size, parts, name in zip(output_sizes, num_shards, names)]
        self.full_output_sizes = list(output_sizes)
        self.shard_indices = shard_indices or [tp_rank()] * len(output_sizes)
        super().__init__(in_features, local, shard_ids, bias)

    def _load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard_id) -> None:
        if shard_id not in self.shard_ids:
            raise ValueError(f"shard_id must be one of {self.shard_ids}, got {shard_id!r}")
        index = self.shard_ids.index(shard_id)
        piece = shard_of(loaded, 0, self.full_output_sizes[index], self.shard_indices[index], self.output_sizes[index])
        super()._load_shard(param, piece, shard_id)


class QKVParallelLinear(MergedColumnParallelLinear):
    """The fused q/k/v projection of ``num_heads`` query and ``num_kv_heads`` KV heads of ``head_dim``.

    Attributes:
        num_local_heads, num_local_kv_heads: the heads of this rank (``num_heads / tp``; ``num_kv_heads / tp``, or
            1 when ``tp > num_kv_heads``).
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool):
        tp, rank = tp_size(), tp_rank()
        self.num_local_heads = split_size(num_heads, tp, "num_attention_heads")
        if tp >= num_kv_heads:
            if tp % num_kv_heads:
                raise ValueError(f"tensor_parallel_size ({tp}) is not a multiple of num_key_value_heads "
                                 f"({num_kv_heads}): the KV heads cannot be replicated evenly")
            kv_shards, kv_index = num_kv_heads, rank // (tp // num_kv_heads)
        else:
            split_size(num_kv_heads, tp, "num_key_value_heads")
            kv_shards, kv_index = tp, rank
        self.num_local_kv_heads = num_kv_heads // kv_shards
        kv_size = num_kv_heads * head_dim
        super().__init__(hidden_size, [num_heads * head_dim, kv_size, kv_size], ("q", "k", "v"), bias,
                         num_shards=[tp, kv_shards, kv_shards], shard_indices=[rank, kv_index, kv_index],
                         names=("num_attention_heads", "num_key_value_heads", "num_key_value_heads"))


class RowParallelLinear(Linear):
    """``y = sum over ranks of x[:, rank's slice] @ weight[:, rank's slice].T``, plus the bias once:
    (T, in / tp) -> (T, out), the same on every rank. With ``reduce_results=False`` it returns this rank's partial
    sum (bias on rank 0 only), for a caller that adds several partial sums before one all-reduce (a MoE layer's
    routed and shared experts).

    ``forward(x, residual=residual)`` returns ``residual + y``, the new residual stream: with one rank the add runs
    in the product's epilogue where the kernel runs (``adds_residual``); with more it follows the all-reduce as a
    launch of its own (an epilogue add would count it once per rank). ``norm`` (``Linear.forward``'s prologue)
    needs the whole input row: one rank only."""

    def __init__(self, in_features: int, out_features: int, bias: bool, name: str = "input features",
                 reduce_results: bool = True):
        self.full_in_features = in_features
        self.reduce_results = reduce_results
        super().__init__(split_size(in_features, tp_size(), name), out_features, bias)
        self.weight.weight_loader = self._load_columns
        if self.bias is not None:
            self.bias.weight_loader = self._load_bias

    def _load_columns(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        copy_weight_loader(param, shard_of(loaded, 1, self.full_in_features, tp_rank(), param.shape[1]))

    @staticmethod
    def _load_bias(param: nn.Parameter, loaded: torch.Tensor) -> None:
        copy_weight_loader(param, loaded if tp_rank() == 0 else torch.zeros_like(loaded))

    def forward(self, x: torch.Tensor, norm=None, residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is not None and not self.reduce_results:
            raise ValueError("residual needs reduce_results: a partial sum cannot take the residual stream")
        if tp_size() == 1:
            return super().forward(x, norm, residual)
        if norm is not None:
            raise ValueError("norm must be None under tensor parallelism: the input features are split")
        partial = super().forward(x)
        if not self.reduce_results:
            return partial
        summed = all_reduce(partial)
        return summed if residual is None else summed + residual

    def adds_residual(self, num_rows: int) -> bool:
        return tp_size() == 1 and self.reduce_results and super().adds_residual(num_rows)


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """The vocabulary rounded up to a multiple of ``64 * tp`` (unchanged with one rank)."""
    if tp == 1:
        return vocab_size
    step = VOCAB_PADDING * tp
    return -(-vocab_size // step) * step


class _VocabShard:
    """Rows ``[start, start + rows)`` of the padded vocabulary: this rank's part of the embedding / LM head."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.rows = padded_vocab_size(vocab_size, tp_size()) // tp_size()
        self.start = tp_rank() * self.rows

    def load(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        """Copy the checkpoint rows of this rank into ``param`` (padding rows: zeros)."""
        if loaded.dim() != 2 or loaded.shape[0] != self.vocab_size or loaded.shape[1] != param.shape[1]:
            raise ValueError(f"weight of shape {tuple(loaded.shape)} does not fit a vocabulary of "
                             f"({self.vocab_size}, {param.shape[1]})")
        real = max(0, min(self.rows, self.vocab_size - self.start))
        param.data.zero_()
        param.data[:real].copy_(loaded[self.start:self.start + real])


class VocabParallelEmbedding(VocabEmbedding):
    """(T,) ids -> (T, hidden_size): each rank embeds the ids of its vocabulary rows, the rest are zeros, summed."""

    def __init__(self, vocab_size: int, hidden_size: int):
        self.shard = _VocabShard(vocab_size)
        super().__init__(self.shard.rows, hidden_size)
        if tp_size() > 1:
            self.weight.weight_loader = self.shard.load

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            return super().forward(input_ids)
        local_ids = input_ids - self.shard.start
        outside = (local_ids < 0) | (local_ids >= self.shard.rows)
        embedded = F.embedding(local_ids.masked_fill(outside, 0), self.weight)
        return all_reduce(embedded.masked_fill_(outside.unsqueeze(-1), 0))


class ParallelLMHead(LMHead):
    """(N, hidden_size) -> (N, vocab_size) float32 logits on every rank: each rank's vocabulary rows, all-gathered.
    With tied embeddings it shares the (equally split) embedding's weight."""

    def __init__(self, vocab_size: int, hidden_size: int, tied_embedding: VocabParallelEmbedding | None = None):
        self.vocab_size = vocab_size
        shard = _VocabShard(vocab_size)
        super().__init__(shard.rows, hidden_size, tied_embedding)
        if tied_embedding is None and tp_size() > 1:
            self.weight.weight_loader = shard.load

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            return super().forward(hidden)
        return all_gather_columns(F.linear(hidden, self.weight))[:, :self.vocab_size].float()
