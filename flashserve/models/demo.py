"""The built-in demo model of ``flashserve generate``: a small random-weight Llama checkpoint made on first use.

Its weights are random, so its text is gibberish; it exists so that the first command of the README runs anywhere
in seconds without a download. Point ``--model`` at a real Hugging Face checkpoint directory for real text.
"""
import os
import shutil
import tempfile

import torch

from flashserve.cache_dir import cache_root
from flashserve.models.checkpoint import write_random_checkpoint

DEMO_DIR_NAME = "demo-llama"
DEMO_CONFIG = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
                   initializer_range=0.05, rope_theta=500000.0)
DEMO_TOKENIZER_VOCAB_SIZE = 2048
DEMO_SEED = 1234


def demo_model_path() -> str:
    """The directory of the demo checkpoint (``<cache root>/demo-llama``), written on first use.

    The checkpoint is written into a temporary directory next to it and renamed into place, so a crash or a
    concurrent first use never leaves a half-written model behind.
    """
    root = cache_root()
    path = os.path.join(root, DEMO_DIR_NAME)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    os.makedirs(root, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{DEMO_DIR_NAME}-", dir=root)
    os.chmod(staging, 0o755)
    try:
        write_random_checkpoint(staging, "LlamaForCausalLM", seed=DEMO_SEED, dtype=torch.float32,
                                tokenizer_vocab_size=DEMO_TOKENIZER_VOCAB_SIZE, **DEMO_CONFIG)
        os.rename(staging, path)
    except OSError:
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
