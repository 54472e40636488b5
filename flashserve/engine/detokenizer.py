"""Incremental detokenization and stop strings.

Decoding one token at a time is wrong for byte-level BPE (a character may span tokens) and for tokenizers whose
decoded text depends on the neighbours (leading spaces). So each step decodes a short window twice — the tokens
already turned into text, and the same plus the new ones — and emits the difference; while the window's text ends in
an incomplete character ("\\ufffd"), nothing is emitted and the bytes wait for the next token. When the request
ends, whatever is left is flushed as it is.

``OutputText`` builds on it what a request returns: its text with stop strings found and cut, the part of the text
not yet sent, and the text of each logprob token. The engine uses it when it detokenizes (``LLM``); the server runs
it outside the engine thread, on token ids the engine returns untouched (``SamplingParams.detokenize=False``).

With a fast tokenizer the windows go straight to its Rust ``tokenizers.Tokenizer`` (what ``decode`` calls without
clean-up, minus the per-call Python conversions, which dominate for windows of a few tokens).

Byte-level BPE tokenizers take a shortcut that gives the same text without calling the tokenizer
(``flashserve.engine.token_bytes``): while the window's old tokens are vocabulary tokens whose bytes are valid
UTF-8, decoding the window is decoding those bytes, then the new ones — the new bytes alone decide the delta. So
the new tokens' bytes are decoded in Python (one new token whose bytes alone are complete text: its text
from ``token_texts``, decoded once per tokenizer): valid text is the delta (held back, as above, if it ends in
"\\ufffd"); bytes ending in an incomplete character wait; anything else (invalid bytes, an added token, a flush of
a partial character) takes the two decodes above.
"""
from flashserve.engine.token_bytes import token_bytes, token_texts
from flashserve.sampling_params import SamplingParams

_CONTEXT_TOKENS = 5
_SENT_PIECES = 256  # pieces of sent text an OutputText keeps before joining them (a copy of the text per 256 tokens)


class IncrementalDetokenizer:
    """Turns a request's generated tokens into text, a few at a time.

    Args:
        tokenizer: a Hugging Face tokenizer.
        prompt_token_ids: the prompt, whose last tokens give the first output token its context.
        skip_special_tokens: leave special tokens out of the text.
    """

    __slots__ = ("tokenizer", "backend", "skip_special_tokens", "read_offset", "prefix_offset", "token_bytes",
                 "token_texts", "prefix_is_text")

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        self.skip_special_tokens = skip_special_tokens
        self.read_offset = len(prompt_token_ids)
        self.prefix_offset = max(self.read_offset - _CONTEXT_TOKENS, 0)
        self.token_bytes = token_bytes(tokenizer)
        self.token_texts = token_texts(tokenizer)
        self.prefix_is_text = self._is_text(prompt_token_ids[self.prefix_offset:self.read_offset])

    def _is_text(self, token_ids: list[int]) -> bool:
        """Whether ``token_ids`` are all in the byte table and their bytes are valid UTF-8."""
        data = self._window_bytes(token_ids, len(token_ids))
        return data is not None and _is_utf8(data[0])

    def _decode(self, token_ids: list[int]) -> str:
        if self.backend is not None:
            return self.backend.decode(token_ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def step(self, token_ids: list[int], flush: bool = False) -> str:
        """The new text after ``token_ids`` (prompt + output so far) grew; ``flush`` emits even a partial character."""
        if self.prefix_is_text:
            read_offset = self.read_offset
            if len(token_ids) == read_offset + 1:  # the usual step: one token, whose text may be in the table
                try:
                    text = self.token_texts[token_ids[read_offset]]
                except IndexError:
                    text = False  # an id past the table
                if text:
                    self.prefix_offset = read_offset
                    self.read_offset = read_offset + 1
                    return text
                if text is False:  # an added token or invalid bytes: the window decides
                    return self._step_by_tokenizer(token_ids, flush)
                if text is not None and not flush:
                    return ""  # nothing yet, or the start of a character: wait for the next token
            table, new_ids = self.token_bytes, token_ids[read_offset:]
            try:
                if len(new_ids) == 1:  # the usual step: one token, no join
                    text = table[new_ids[0]].decode()
                else:
                    text = b"".join([table[token_id] for token_id in new_ids]).decode()
            except (TypeError, IndexError, AttributeError):
                pass  # an added token (None in the table) or an id past the table
            except UnicodeDecodeError as error:
                if error.reason == "unexpected end of data" and not flush:
                    return ""  # valid bytes, then the start of a character
            else:
                if not text or (text.endswith("\ufffd") and not flush):
                    return ""
                self.prefix_offset = self.read_offset
                self.read_offset = len(token_ids)
                return text
        return self._step_by_tokenizer(token_ids, flush)

    def _window_bytes(self, window: list[int], split: int) -> tuple[bytes, bytes] | None:
        """The bytes of ``window[:split]`` and of ``window[split:]`` from the byte table; None when a token is not
        in the table (an added token, an id past it) or there is no table."""
        table = self.token_bytes
        if table is None:
            return None
        try:
            parts = [table[token_id] for token_id in window]
            return b"".join(parts[:split]), b"".join(parts[split:])
        except (TypeError, IndexError):
            return None

    def _step_by_tokenizer(self, token_ids: list[int], flush: bool) -> str:
        """``step`` by decoding the window with and without the new tokens: from the byte table when all its
        tokens are in it (UTF-8 with U+FFFD for each maximal invalid subpart, as the Rust ``ByteLevel`` decoder
        does), else by the tokenizer."""
        window = token_ids[self.prefix_offset:]
        split = self.read_offset - self.prefix_offset
        data = self._window_bytes(window, split)
        if data is not None:
            prefix_text = data[0].decode(errors="replace")
            full_text = (data[0] + data[1]).decode(errors="replace")
        else:
            prefix_text, full_text = self._decode(window[:split]), self._decode(window)
        if len(full_text) <= len(prefix_text) or (full_text.endswith("\ufffd") and not flush):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(token_ids)
        # the new window is the tokens just read
        self.prefix_is_text = _is_utf8(data[1]) if data is not None else self._is_text(window[split:])
        return full_text[len(prefix_text):]


def _is_utf8(data: bytes) -> bool:
    """Whether ``data`` is valid UTF-8."""
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


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


class OutputText:
    """One request's output text, built token by token, with its stop strings.

    Without stop strings the text is kept in pieces (the sent ones, joined now and then, and those not sent yet),
    so that a token costs O(its text), not a copy of the whole text; ``text`` joins them when read.

    Args:
        tokenizer: a Hugging Face tokenizer.
        prompt_token_ids: the request's prompt.
        params: its sampling parameters (stop strings, ``min_tokens``, ``include_stop_str_in_output``,
            ``skip_special_tokens``).
    """

    __slots__ = ("params", "detokenizer", "num_sent_chars", "holdback_chars", "stop_strings", "_text", "_sent",
                 "_unsent")

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.params = params
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens)
        self.num_sent_chars = 0
        self.holdback_chars = stop_holdback(params)
        self.stop_strings = params.stop_strings
        self._text = ""  # with stop strings: the whole text
        self._sent: list[str] = []  # without: the pieces sent, and those not sent yet
        self._unsent: list[str] = []

    @property
    def text(self) -> str:
        """The text so far (stop string cut unless ``include_stop_str_in_output``)."""
        if self.stop_strings:
            return self._text
        return "".join(self._sent) + "".join(self._unsent)

    def add(self, token_ids: list[int], num_output_tokens: int, finish_reason: str | None) -> str | None:
        """Extend the text by the last token of ``token_ids`` (prompt + output so far).

        Args:
            num_output_tokens: the output tokens in ``token_ids``, the new one included.
            finish_reason: "stop" when the new token is an EOS or stop token (its text is left out unless
                ``include_stop_str_in_output``), "length" when it is the last one allowed, else None.

        Returns the stop string that ends the text now (the text is cut after it, or before it unless
        ``include_stop_str_in_output``), or None.
        """
        if finish_reason is None:
            delta = self.detokenizer.step(token_ids)
        elif finish_reason == "stop":
            kept = token_ids if self.params.include_stop_str_in_output else token_ids[:-1]
            delta = self.detokenizer.step(kept, flush=True)
        else:
            delta = self.detokenizer.step(token_ids)
            if finish_reason == "length":
                delta += self.detokenizer.step(token_ids, flush=True)
        if not delta:
            return None
        if not self.stop_strings:
            self._unsent.append(delta)
            return None
        text = self._text + delta
        stop_string = None
        params = self.params
        if num_output_tokens >= params.min_tokens:
            match = find_stop_string(text, len(delta), params)
            if match is not None:
                stop_string = text[match[0]:match[1]]
                text = text[:match[1] if params.include_stop_str_in_output else match[0]]
        self._text = text
        return stop_string

    def extend(self, token_ids: list[int], num_output_tokens: int, finish_reason: str | None
               ) -> tuple[str | None, str]:
        """``add``, then ``take_unsent`` for the request as it then stands (finished if it has a finish reason or
        a stop string ended it): (the stop string or None, the text not returned before)."""
        if finish_reason is None and not self.stop_strings and not self._unsent:  # the usual step: all of it
            delta = self.detokenizer.step(token_ids)
            if delta:
                self._mark_sent(delta)
            return None, delta
        stop_string = self.add(token_ids, num_output_tokens, finish_reason)
        return stop_string, self.take_unsent(finish_reason is not None or stop_string is not None)

    def take_unsent(self, finished: bool) -> str:
        """The text not returned before, less what may still turn out to start a stop string (unless finished)."""
        if not self.stop_strings:
            pieces = self._unsent
            if not pieces:
                return ""
            unsent = pieces[0] if len(pieces) == 1 else "".join(pieces)
            pieces.clear()
            self._mark_sent(unsent)
            return unsent
        start = self.num_sent_chars
        end = len(self._text) if finished else len(self._text) - self.holdback_chars
        if end <= start:
            return ""
        self.num_sent_chars = end
        return self._text[start:end]

    def _mark_sent(self, text: str) -> None:
        """Without stop strings: ``text`` (the end of the text) is returned now."""
        sent = self._sent
        sent.append(text)
        if len(sent) >= _SENT_PIECES:
            self._sent = ["".join(sent)]
        self.num_sent_chars += len(text)


class TokenTexts:
    """Each token's text on its own, decoded once and remembered (logprob entries repeat the same few tokens).

    Args:
        tokenizer: a Hugging Face tokenizer.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._texts: dict[tuple[int, bool], str] = {}

    def fill(self, entries: list[dict | None], skip_special_tokens: bool) -> None:
        """Set the ``decoded_token`` of every Logprob in ``entries`` (dicts of token id -> Logprob; None skipped)."""
        texts = self._texts
        for entry in entries:
            for token_id, logprob in (entry or {}).items():
                key = (token_id, skip_special_tokens)
                text = texts.get(key)
                if text is None:
                    text = texts[key] = self.tokenizer.decode([token_id], skip_special_tokens=skip_special_tokens)
                logprob.decoded_token = text
