"""Tokenization for the server, off the engine thread.

Tokenizing a long prompt (or rendering a chat template) takes time proportional to its size — seconds for a few
MB — and the engine thread must only step, or every running stream stalls. ``ServerTokenizer`` owns a tokenizer of
its own (loaded from the engine's tokenizer directory, with the server's chat template if one was given) and one
worker thread that uses it, so the tokenizer is never shared between threads and the event loop never blocks.
"""
import asyncio
import concurrent.futures
from collections.abc import Callable

from transformers import AutoTokenizer

from flashserve.config import Config


class ServerTokenizer:
    """A tokenizer and the one thread that uses it.

    Args:
        config: the engine's configuration (the tokenizer comes from ``config.tokenizer or config.model``).
        chat_template: a Jinja chat template replacing the tokenizer's (None keeps it).
    """

    def __init__(self, config: Config, chat_template: str | None = None):
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model, local_files_only=True)
        if chat_template is not None:
            self.tokenizer.chat_template = chat_template
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                               thread_name_prefix="flashserve-tokenizer")

    async def run(self, fn: Callable[[object], object]):
        """``fn(tokenizer)`` in the tokenizer thread; its result (or exception) here."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, self.tokenizer)

    def close(self) -> None:
        """Stop the thread once the queued work is done."""
        self._executor.shutdown(wait=False, cancel_futures=True)
