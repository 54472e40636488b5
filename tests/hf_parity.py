"""What the greedy-parity tests compare against: a random-weight checkpoint and Hugging Face's continuations."""
from collections.abc import Callable

import torch

from flashserve.models.checkpoint import write_random_checkpoint


def checkpoint_with_continuations(directory: str, architecture: str, overrides: dict, seed: int,
                                  make_prompts: Callable[[int], list[list[int]]], new_tokens: int):
    """Write a tiny random checkpoint into ``directory`` and return (directory, prompts, the greedy continuations of
    transformers' ``generate(do_sample=False)`` in float32 on the CPU, EOS disabled); ``make_prompts(vocab_size)``
    draws the prompts."""
    from transformers import AutoModelForCausalLM

    write_random_checkpoint(directory, architecture, seed=seed, **overrides)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    prompts = make_prompts(model.config.vocab_size)
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            expected.append(out[0, len(prompt):].tolist())
    return directory, prompts, expected
