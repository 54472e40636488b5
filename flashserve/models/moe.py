"""The sparse MLP of mixture-of-experts layers: a router, stacked routed experts, an optional shared expert.

Module and parameter names follow Hugging Face's (transformers 5 in memory): ``mlp.gate.weight`` (E, H) is the
router, ``mlp.experts.gate_up_proj`` (E, 2I, H) and ``mlp.experts.down_proj`` (E, H, I) the stacked experts,
``mlp.shared_expert.*`` and ``mlp.shared_expert_gate.weight`` (1, H) Qwen2-MoE's shared expert. Checkpoints store
the experts one tensor each (``experts.{e}.gate_proj/up_proj/down_proj.weight``, Mixtral's ``w1/w3/w2``): the
loader (``moe_loading``) copies each into its slice of the stacked parameter, so no second copy is ever held;
stacked tensors saved whole are read expert by expert from a lazy slice, this rank's part only.
"""
import torch
from torch import nn

from flashserve.distributed import layers as parallel  # a module, not its names: it imports models.layers
from flashserve.distributed.state import all_reduce, tp_rank, tp_size
from flashserve.kernels._dispatch import use_triton
from flashserve.kernels.moe import fused_moe
from flashserve.models.layers import Linear, RMSNorm, copy_weight_loader
from flashserve.models.spec import ModelSpec

EXPERT_PARTS = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", None)}


class StackedExperts(nn.Module):
    """The routed experts' weights, stacked along a leading expert dimension (the fused-MoE kernel's layout).

    ``gate_up_proj[e]`` holds expert e's gate rows then its up rows; the weight loaders take either the whole
    stacked tensor or one expert's part with ``shard_id = (expert, part)`` (part "gate_proj", "up_proj" or
    "down_proj"). ``checkpoint_names`` lists the per-expert tensor names (relative to this module) a checkpoint
    must provide for a parameter.

    Under tensor parallelism every expert is split along its intermediate dimension: rank r holds rows
    ``[r * I / tp, (r + 1) * I / tp)`` of each expert's gate and up projections and the same columns of its down
    projection (``local_intermediate_size = I / tp``; ValueError naming ``size_name`` unless tp divides I), cut
    from each per-expert checkpoint tensor as it is read, or read alone from a stacked one; the experts' output is
    then this rank's partial sum, which the caller all-reduces.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, size_name: str):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.local_intermediate_size = local = parallel.split_size(intermediate_size, tp_size(), size_name)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * local, hidden_size), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, local), requires_grad=False)
        for name, parts in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
            param = getattr(self, name)
            param.weight_loader = self._load
            param.checkpoint_names = [f"{e}.{part}.weight" for e in range(num_experts) for part in parts]

    def _load(self, param: nn.Parameter, loaded_weight, shard_id=None) -> None:
        if shard_id is None:
            self._load_stacked(param, loaded_weight)
            return
        expert, part = shard_id
        if not 0 <= expert < param.shape[0]:
            raise ValueError(f"expert index {expert} is out of range for {param.shape[0]} experts")
        self._load_part(param, loaded_weight, expert, part)

    def _load_stacked(self, param: nn.Parameter, loaded_weight) -> None:
        """The whole stacked tensor, (E, 2I, H) or (E, H, I): a torch.Tensor or a lazy safetensors slice (which has
        ``get_shape``). Each expert's slice of this rank is indexed out alone, so a slice reads only those bytes
        and at most one expert's (I / tp, H) piece is held beside the parameter."""
        num_experts, full, local = param.shape[0], self.intermediate_size, self.local_intermediate_size
        gated = param is self.gate_up_proj
        shape = (num_experts, 2 * full, param.shape[2]) if gated else (num_experts, param.shape[1], full)
        loaded_shape = tuple(loaded_weight.get_shape() if hasattr(loaded_weight, "get_shape") else loaded_weight.shape)
        if loaded_shape != shape:
            raise ValueError(f"weight of shape {loaded_shape} does not fit stacked experts of shape {shape}")
        start = tp_rank() * local
        for expert in range(num_experts):
            target = param.data[expert]
            if gated:
                copy_weight_loader(target[:local], loaded_weight[expert, start:start + local])
                copy_weight_loader(target[local:], loaded_weight[expert, full + start:full + start + local])
            else:
                copy_weight_loader(target, loaded_weight[expert, :, start:start + local])

    def _load_part(self, param: nn.Parameter, loaded_weight: torch.Tensor, expert: int, part: str) -> None:
        """Copy this rank's slice of one expert's (I, H) gate/up or (H, I) down tensor into ``param[expert]``."""
        full, local = self.intermediate_size, self.local_intermediate_size
        target = param.data[expert]
        half = EXPERT_PARTS[part][1]
        if half is None:
            piece = parallel.shard_of(loaded_weight, 1, full, tp_rank(), local)
        else:
            target = target.narrow(0, half * local, local)
            piece = parallel.shard_of(loaded_weight, 0, full, tp_rank(), local)
        copy_weight_loader(target, piece)


class SparseMoeBlock(nn.Module):
    """x (T, H) -> sum over the top-k routed experts of each token (``fused_moe``), plus the sigmoid-gated shared
    expert when the spec has one (Qwen2-MoE). ``dense_mlp(spec, intermediate_size, reduce_results)`` builds the
    shared expert (the decoder's SwiGLU ``MLP``).

    Under tensor parallelism the router and the shared expert's gate are replicated, the routed experts split
    along their intermediate dimension (``StackedExperts``) and the shared expert like the dense MLP; both give
    this rank's partial sums, added and all-reduced once.

    ``forward(x, norm, residual)``: ``residual + moe(norm(x))``, the norm a launch of its own (the fused-MoE kernel
    has no prologue). ``adds_residual``: with one rank, no shared expert and the Triton kernels, the residual rides
    on the fused-MoE launch that sums each token's k rows (``fused_moe(..., residual=)``: no launch of its own);
    otherwise the block takes none and the decoder leaves the add to the next fused add + RMSNorm."""

    def __init__(self, spec: ModelSpec, dense_mlp: type):
        super().__init__()
        moe = spec.moe
        self.top_k, self.renormalize = moe.top_k, moe.renormalize
        self.gate = Linear(spec.hidden_size, moe.num_experts, False)
        self.experts = StackedExperts(moe.num_experts, spec.hidden_size, moe.expert_intermediate_size,
                                      moe.expert_intermediate_key)
        self.shared_expert = None
        self.shared_expert_gate = None
        if moe.shared_expert_intermediate_size:
            self.shared_expert = dense_mlp(spec, moe.shared_expert_intermediate_size, reduce_results=False)
            self.shared_expert_gate = Linear(spec.hidden_size, 1, False)

    def adds_residual(self, num_tokens: int) -> bool:
        return tp_size() == 1 and self.shared_expert is None and use_triton(self.experts.down_proj)

    def folds_norm(self, num_tokens: int) -> bool:
        """False: the norm is a launch of its own (``forward``)."""
        return False

    def forward(self, x: torch.Tensor, norm: RMSNorm | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        if norm is not None:
            x = norm(x)
        if residual is not None and not self.adds_residual(x.shape[0]):
            raise ValueError("residual: this MoE block adds no residual (see adds_residual)")
        out = fused_moe(x, self.experts.gate_up_proj, self.experts.down_proj, self.gate(x), self.top_k,
                        self.renormalize, residual=residual)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return all_reduce(out)
