"""Hugging Face decoder-only models: one decoder for Llama 2/3/3.1/3.2, Qwen2/2.5, Qwen3, Mistral and the
mixture-of-experts Qwen3-MoE, Mixtral and Qwen2-MoE, the checkpoint loader, random test checkpoints and the
built-in demo model."""
from flashserve.models.attention import Attention
from flashserve.models.checkpoint import write_random_checkpoint
from flashserve.models.decoder import DecoderForCausalLM
from flashserve.models.demo import demo_model_path
from flashserve.models.loader import load_model
from flashserve.models.registry import ARCHITECTURES
from flashserve.models.spec import ModelSpec, load_spec

__all__ = ["ARCHITECTURES", "Attention", "DecoderForCausalLM", "ModelSpec", "demo_model_path", "load_model",
           "load_spec", "write_random_checkpoint"]
