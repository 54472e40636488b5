"""Incremental detokenization and stop strings.

Decoding one token at a time is wrong for byte-level BPE (a character may span tokens) and for tokenizers whose
decoded text depends on the neighbours (leading spaces). So each step decodes a short window twice — the tokens
already turned into text, and the same plus the new ones — and emits the difference; while the window's text ends in
an incomplete character ("\\ufffd"), nothing is emitted and the bytes wait for the next token. When the request
ends, whatever is left is flushed as it is.

With a fast tokenizer the windows go straight to its Rust ``tokenizers.Tokenizer`` (what ``decode`` calls without
clean-up, minus the per-call Python conversions, which dominate for windows of a few tokens).
"""
from flashserve.sampling_params import SamplingParams

_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns a request's generated tokens into text, a few at a time.

    Args:
        tokenizer: a Hugging Face tokenizer.
        prompt_token_ids: the prompt, whose last tokens give the first output token its context.
        skip_special_tokens: leave special tokens out of the text.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        self.skip_special_tokens = skip_special_tokens
        self.read_offset = len(prompt_token_ids)
        self.prefix_offset = max(self.read_offset - _CONTEXT_TOKENS, 0)

    def _decode(self, token_ids: list[int]) -> str:
        if self.backend is not None:
            return self.backend.decode(token_ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def step(self, token_ids: list[int], flush: bool = False) -> str:
        """The new text after ``token_ids`` (prompt + output so far) grew; ``flush`` emits even a partial character."""
        prefix_text = self._decode(token_ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(token_ids[self.prefix_offset:])
        if len(full_text) <= len(prefix_text) or (full_text.endswith("\ufffd") and not flush):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(token_ids)
        return full_text[len(prefix_text):]


def find_stop_string(text: str, num_new_chars: int, params: SamplingParams) -> tuple[int, int] | None:
    """Where a stop string first ends ``text``, searching only where the last ``num_new_chars`` characters matter.

    Returns (start, end) of the earliest match, or None.
    """
    best: tuple[int, int] | None = None
    for stop in params.stop_strings:
        start = text.find(stop, max(0, len(text) - num_new_chars - len(stop) + 1))
        if start >= 0 and (best is None or start < best[0]):
            best = (start, start + len(stop))
    return best


def stop_holdback(params: SamplingParams) -> int:
    """Characters a running request keeps unsent, since they may be the start of a stop string."""
    if params.include_stop_str_in_output or not params.stop_strings:
        return 0
    return max(len(stop) for stop in params.stop_strings) - 1
