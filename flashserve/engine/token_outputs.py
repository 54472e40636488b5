"""The host work of reading a sampled token: append it to its request, check the stop conditions (EOS, stop token
ids, the grammar, ``min_tokens``, the length), extend the request's text, and build the ``RequestOutput`` of what is
new since the request's previous output. ``LLMEngine._read`` runs it for every token of a step."""
import operator
from collections.abc import Iterable

from flashserve.engine.detokenizer import TokenTexts
from flashserve.engine.request import PENDING_TOKEN, Request, RequestStatus
from flashserve.outputs import CompletionOutput, Logprob, RequestOutput

_FINISHED = RequestStatus.FINISHED


class OutputProcessor:
    """Per-token output work for one engine: its tokenizer's token texts (for logprobs) and its EOS token ids."""

    __slots__ = ("token_texts", "eos_token_ids")

    def __init__(self, token_texts: TokenTexts, eos_token_ids: list[int]):
        self.token_texts = token_texts
        self.eos_token_ids = eos_token_ids

    def append_token(self, request: Request, token_id: int, token_logprobs: dict[int, Logprob] | None
                     ) -> tuple[str | None, str]:
        """Add a sampled token (in place of the request's ``PENDING_TOKEN`` if it ends with one), extend the text;
        returns the finish reason when a stop condition is met (None otherwise) and the text not returned before
        (taken now: the request ends if and only if there is a finish reason). A token outside the request's
        ``stop_token_set`` without a grammar can only end it by length (one set lookup per token)."""
        token_ids = request.token_ids
        if token_ids[-1] == PENDING_TOKEN:
            token_ids[-1] = token_id
        else:
            token_ids.append(token_id)
        if request.logprobs is not None:
            if request.text is not None:
                self.token_texts.fill([token_logprobs], request.params.skip_special_tokens)
            request.logprobs.append(token_logprobs)
        num_tokens = len(token_ids)
        if request.grammar is not None or token_id in request.stop_token_set:
            reason = self.stop_reason(request, token_id)
        else:
            reason = "length" if num_tokens >= request.max_total_tokens else None
        text = request.text
        if text is None:
            return reason, ""
        stop_string, unsent = text.extend(token_ids, num_tokens - request.num_prompt_tokens, reason)
        if stop_string is not None:
            request.stop_reason = stop_string
            reason = "stop"
        return reason, unsent

    def stop_reason(self, request: Request, token_id: int) -> str | None:
        """The finish reason for the request's new token ``token_id`` (appended) when it is in the request's
        ``stop_token_set`` or the request has a grammar (which accepts the token now); sets ``stop_reason``."""
        params = request.params
        is_eos = not params.ignore_eos and token_id in self.eos_token_ids
        grammar_done = request.grammar is not None and request.grammar.accept(token_id)
        num_output_tokens = len(request.token_ids) - request.num_prompt_tokens
        if grammar_done or (num_output_tokens >= params.min_tokens and (is_eos or token_id in params.stop_token_ids)):
            request.stop_reason = None if is_eos or grammar_done else token_id
            return "stop"
        return "length" if len(request.token_ids) >= request.max_total_tokens else None

    @staticmethod
    def new_output(request: Request, text: str | None = None) -> RequestOutput:
        """The request's text (``text`` when taken already), tokens and logprobs not yet returned by ``step``, and
        its prompt logprobs if this is its first output (the one before any token was sent)."""
        finished = request.status is _FINISHED
        num_sent_tokens = request.num_sent_tokens
        if text is None:
            text = "" if request.text is None else request.text.take_unsent(finished)
        new_tokens = request.token_ids[request.num_prompt_tokens + num_sent_tokens:]
        request.num_sent_tokens = num_sent_tokens + len(new_tokens)
        logprobs = None
        if request.logprobs is not None:
            logprobs = request.logprobs[request.num_sent_logprobs:]
            request.num_sent_logprobs = len(request.logprobs)
        completion = CompletionOutput(0, text, new_tokens, request.finish_reason, logprobs, request.stop_reason)
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, [completion], finished,
                             request.prompt_logprobs if num_sent_tokens == 0 else None)


def token_id_list(token_ids, vocab_size: int) -> list[int]:
    """Prompt token ids (any sequence of integers, numpy ones included) -> list[int]; ValueError for anything that
    is not an integer in [0, vocab_size)."""
    if isinstance(token_ids, str) or not isinstance(token_ids, Iterable):
        raise ValueError(f"prompt token ids must be a list of integers, got {type(token_ids).__name__}")
    result = []
    for token in token_ids:
        if isinstance(token, bool):
            raise ValueError(f"prompt token ids must be integers, got {token!r}")
        try:
            token = operator.index(token)
        except TypeError:
            raise ValueError(f"prompt token ids must be integers, got {token!r}") from None
        if not 0 <= token < vocab_size:
            raise ValueError(f"prompt token id {token} is outside the vocabulary [0, {vocab_size})")
        result.append(token)
    return result

