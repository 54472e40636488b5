"""The sparse MLP of mixture-of-experts layers: a router, stacked routed experts, an optional shared expert.

Module and parameter names follow Hugging Face's (transformers 5 in memory): ``mlp.gate.weight`` (E, H) is the
router, ``mlp.experts.gate_up_proj`` (E, 2I, H) and ``mlp.experts.down_proj`` (E, H, I) the stacked experts,
``mlp.shared_expert.*`` and ``mlp.shared_expert_gate.weight`` (1, H) Qwen2-MoE's shared expert. Checkpoints store
the experts one tensor each (``experts.{e}.gate_proj/up_proj/down_proj.weight``, Mixtral's ``w1/w3/w2``): the
loader (``moe_loading``) copies each into its slice of the stacked parameter, so no second copy is ever held.
"""
import torch
from torch import nn

from flashserve.kernels.moe import fused_moe
from flashserve.models.layers import Linear, copy_weight_loader
from flashserve.models.spec import ModelSpec

EXPERT_PARTS = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", None)}


class StackedExperts(nn.Module):
    """The routed experts' weights, stacked along a leading expert dimension (the fused-MoE kernel's layout).

    ``gate_up_proj[e]`` holds expert e's gate rows then its up rows; the weight loaders take either the whole
    stacked tensor or one expert's part with ``shard_id = (expert, part)`` (part "gate_proj", "up_proj" or
    "down_proj"). ``checkpoint_names`` lists the per-expert tensor names (relative to this module) a checkpoint
    must provide for a parameter.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size),
                                         requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size), requires_grad=False)
        for name, parts in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
            param = getattr(self, name)
            param.weight_loader = self._load
            param.checkpoint_names = [f"{e}.{part}.weight" for e in range(num_experts) for part in parts]

    def _load(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if shard_id is None:
            copy_weight_loader(param, loaded_weight)
            return
        expert, part = shard_id
        if not 0 <= expert < param.shape[0]:
            raise ValueError(f"expert index {expert} is out of range for {param.shape[0]} experts")
        target = param.data[expert]
        half = EXPERT_PARTS[part][1]
        if half is not None:
            target = target.narrow(0, half * self.intermediate_size, self.intermediate_size)
        copy_weight_loader(target, loaded_weight)


class SparseMoeBlock(nn.Module):
    """x (T, H) -> sum over the top-k routed experts of each token (``fused_moe``), plus the sigmoid-gated shared
    expert when the spec has one (Qwen2-MoE). ``dense_mlp(spec, intermediate_size)`` builds the shared expert
    (the decoder's SwiGLU ``MLP``)."""

    def __init__(self, spec: ModelSpec, dense_mlp: type):
        super().__init__()
        moe = spec.moe
        self.top_k, self.renormalize = moe.top_k, moe.renormalize
        self.gate = Linear(spec.hidden_size, moe.num_experts, False)
        self.experts = StackedExperts(moe.num_experts, spec.hidden_size, moe.expert_intermediate_size)
        self.shared_expert = None
        self.shared_expert_gate = None
        if moe.shared_expert_intermediate_size:
            self.shared_expert = dense_mlp(spec, moe.shared_expert_intermediate_size)
            self.shared_expert_gate = Linear(spec.hidden_size, 1, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = fused_moe(x, self.experts.gate_up_proj, self.experts.down_proj, self.gate(x), self.top_k,
                        self.renormalize)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
