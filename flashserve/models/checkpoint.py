"""Tiny random-weight Hugging Face checkpoints with a locally trained byte-level BPE tokenizer.

Used by the tests (parity with transformers) and by the built-in demo model. Everything is deterministic for a
given seed: the same arguments write the same bytes.
"""
import json
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from flashserve.models.corpus import CORPUS
from flashserve.models.registry import get_traits

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TINY_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1)


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2 style, no prefix space) trained on the built-in corpus.

    The vocabulary holds the special tokens (ids 0..5: ``<s> </s> <pad> <|system|> <|user|> <|assistant|>``), the
    256 byte symbols and as many merges as fit in ``vocab_size`` (fewer when the corpus runs out of pairs).
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, directory: str) -> None:
    """Write tokenizer.json and a tokenizer_config.json (with the chat template) loadable by AutoTokenizer."""
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 20,
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def write_random_checkpoint(directory: str, architecture: str = "LlamaForCausalLM", *, seed: int = 0,
                            tokenizer_vocab_size: int = 400, max_shard_size: str | int | None = None,
                            dtype: torch.dtype = torch.float32, **config_overrides) -> str:
    """Write a random-weight checkpoint of ``architecture`` (a config.json ``architectures`` name) into
    ``directory`` with transformers' ``save_pretrained`` (safetensors; sharded with an index when
    ``max_shard_size`` is given) plus a tokenizer trained with ``tokenizers``. Returns ``directory``.

    Norm weights are drawn around 1 and biases around 0 (transformers initialises them to exactly 1 and 0, which
    would hide a misplaced norm or bias from a parity test).

    The config starts from ``TINY_CONFIG`` (hidden 64, 2 layers, 4 heads / 2 KV heads, initializer_range 0.1 so
    that attention scores are far from uniform) with vocab_size = the tokenizer's size and the tokenizer's
    bos/eos/pad ids; ``config_overrides`` (any config.json field, e.g. ``tie_word_embeddings=True``,
    ``rope_scaling={...}``, ``sliding_window=8``) take precedence.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    traits = get_traits(architecture)
    tokenizer = train_tokenizer(tokenizer_vocab_size)
    config_kwargs = dict(TINY_CONFIG, vocab_size=tokenizer.get_vocab_size(),
                         bos_token_id=tokenizer.token_to_id(BOS_TOKEN), eos_token_id=tokenizer.token_to_id(EOS_TOKEN),
                         pad_token_id=tokenizer.token_to_id(PAD_TOKEN))
    config_kwargs.update(config_overrides)
    config = AutoConfig.for_model(traits.model_type, **config_kwargs)
    config.architectures = [architecture]
    os.makedirs(directory, exist_ok=True)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config)
        _randomize_norms_and_biases(model, config.initializer_range)
        model = model.to(dtype)
    finally:
        torch.random.set_rng_state(generator_state)
    save_kwargs = {"safe_serialization": True}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    progress_bar_was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        model.save_pretrained(directory, **save_kwargs)
    finally:
        if progress_bar_was_enabled:
            transformers_logging.enable_progress_bar()
    save_tokenizer(tokenizer, directory)
    return directory


@torch.no_grad()
def _randomize_norms_and_biases(model: torch.nn.Module, scale: float) -> None:
    """Norm weights ~ N(1, scale), biases ~ N(0, scale), from the current torch random state."""
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.normal_(1.0, scale)
        elif name.endswith(".bias"):
            param.normal_(0.0, scale)
