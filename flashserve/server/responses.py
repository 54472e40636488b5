"""OpenAI's response and stream-chunk bodies for completions and chat completions, built from engine outputs.

``Choice`` accumulates one prompt's deltas. ``CompletionFormat`` and ``ChatFormat`` share one interface:
``chunk(index, delta, choice, is_first)`` gives the stream chunk of a delta (or None when it carries nothing),
``response(choices)`` the whole non-streamed body, ``usage_chunk(choices)`` the last chunk when usage is asked for.
"""
from dataclasses import dataclass, field

from flashserve.outputs import Logprob, RequestOutput


@dataclass(slots=True)
class Choice:
    """One prompt's completion so far: text, token ids, logprobs, finish reason and prompt length."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0

    def add(self, delta: RequestOutput) -> None:
        """Append a step's delta."""
        completion = delta.outputs[0]
        self.text += completion.text
        self.token_ids.extend(completion.token_ids)
        self.logprobs.extend(completion.logprobs or ())
        self.finish_reason = completion.finish_reason
        self.num_prompt_tokens = len(delta.prompt_token_ids)


def usage(choices: list[Choice]) -> dict:
    """OpenAI's ``usage``: prompt, completion and total token counts over all choices."""
    prompt_tokens = sum(choice.num_prompt_tokens for choice in choices)
    completion_tokens = sum(len(choice.token_ids) for choice in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _ranked(entries: dict[int, Logprob], num_top: int) -> list[Logprob]:
    """The ``num_top`` most likely entries of one token's logprob dict, most likely first."""
    return sorted(entries.values(), key=lambda entry: entry.rank)[:num_top]


class _Format:
    """What both formats share: the id, creation time and model name every body carries."""

    object_name = ""
    chunk_object_name = ""

    def __init__(self, response_id: str, created: int, model: str, num_top_logprobs: int | None,
                 include_usage: bool = False):
        self.response_id = response_id
        self.created = created
        self.model = model
        self.num_top_logprobs = num_top_logprobs
        self.include_usage = include_usage

    def _body(self, object_name: str, choices: list[dict]) -> dict:
        return {"id": self.response_id, "object": object_name, "created": self.created, "model": self.model,
                "choices": choices}

    def _chunk_body(self, choices: list[dict]) -> dict:
        body = self._body(self.chunk_object_name, choices)
        if self.include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, choices: list[Choice]) -> dict:
        """The last chunk of a stream with ``include_usage``: no choices, the usage."""
        return dict(self._body(self.chunk_object_name, []), usage=usage(choices))


class CompletionFormat(_Format):
    """``/v1/completions`` bodies (``object`` "text_completion"; logprobs as tokens, token_logprobs,
    top_logprobs and text_offset, offsets counted from the start of the completion)."""

    object_name = chunk_object_name = "text_completion"

    def _logprobs(self, token_ids: list[int], logprobs: list[dict[int, Logprob]], text_offset: int) -> dict | None:
        if self.num_top_logprobs is None:
            return None
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        for token_id, entries in zip(token_ids, logprobs):
            sampled = entries[token_id]
            tokens.append(sampled.decoded_token)
            token_logprobs.append(sampled.logprob)
            top_logprobs.append({entry.decoded_token: entry.logprob
                                 for entry in _ranked(entries, self.num_top_logprobs)})
            offsets.append(text_offset)
            text_offset += len(sampled.decoded_token)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": offsets}

    def chunk(self, index: int, delta: RequestOutput, choice: Choice, is_first: bool) -> dict | None:
        """The chunk of ``delta`` (already added to ``choice``); None when it has no text, tokens or end."""
        completion = delta.outputs[0]
        if not (completion.text or completion.token_ids or completion.finish_reason):
            return None
        logprobs = None
        if self.num_top_logprobs is not None:
            start = len(choice.token_ids) - len(completion.token_ids)
            offset = _decoded_length(choice.token_ids[:start], choice.logprobs[:start])
            logprobs = self._logprobs(completion.token_ids, completion.logprobs, offset)
        return self._chunk_body([{"index": index, "text": completion.text, "logprobs": logprobs,
                                  "finish_reason": completion.finish_reason}])

    def response(self, choices: list[Choice]) -> dict:
        """The non-streamed body."""
        body = self._body(self.object_name, [
            {"index": index, "text": choice.text, "logprobs": self._logprobs(choice.token_ids, choice.logprobs, 0),
             "finish_reason": choice.finish_reason} for index, choice in enumerate(choices)])
        return dict(body, usage=usage(choices))


class ChatFormat(_Format):
    """``/v1/chat/completions`` bodies (``object`` "chat.completion" / "chat.completion.chunk"; logprobs as
    ``{"content": [{token, logprob, bytes, top_logprobs}]}``; the first chunk of a choice carries the role)."""

    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def _logprobs(self, token_ids: list[int], logprobs: list[dict[int, Logprob]]) -> dict | None:
        if self.num_top_logprobs is None:
            return None
        content = []
        for token_id, entries in zip(token_ids, logprobs):
            sampled = entries[token_id]
            top = [_token_logprob(entry) for entry in _ranked(entries, self.num_top_logprobs)]
            content.append(dict(_token_logprob(sampled), top_logprobs=top))
        return {"content": content}

    def chunk(self, index: int, delta: RequestOutput, choice: Choice, is_first: bool) -> dict | None:
        """The chunk of ``delta`` (already added to ``choice``); None when it has no text, tokens or end."""
        completion = delta.outputs[0]
        if not (is_first or completion.text or completion.token_ids or completion.finish_reason):
            return None
        message = {"role": "assistant", "content": completion.text} if is_first else {"content": completion.text}
        logprobs = self._logprobs(completion.token_ids, completion.logprobs or [])
        return self._chunk_body([{"index": index, "delta": message, "logprobs": logprobs,
                                  "finish_reason": completion.finish_reason}])

    def response(self, choices: list[Choice]) -> dict:
        """The non-streamed body."""
        body = self._body(self.object_name, [
            {"index": index, "message": {"role": "assistant", "content": choice.text},
             "logprobs": self._logprobs(choice.token_ids, choice.logprobs), "finish_reason": choice.finish_reason}
            for index, choice in enumerate(choices)])
        return dict(body, usage=usage(choices))


def _decoded_length(token_ids: list[int], logprobs: list[dict[int, Logprob]]) -> int:
    """The characters of the sampled tokens' texts, each decoded on its own (completions' ``text_offset`` unit)."""
    return sum(len(entries[token_id].decoded_token) for token_id, entries in zip(token_ids, logprobs))


def _token_logprob(entry: Logprob) -> dict:
    """A chat logprob entry: the token's text, its log-probability and its UTF-8 bytes."""
    return {"token": entry.decoded_token, "logprob": entry.logprob, "bytes": list(entry.decoded_token.encode())}
