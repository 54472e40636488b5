"""OpenAI's response and stream-chunk bodies for completions and chat completions, built from engine outputs.

``Choice`` accumulates one prompt's deltas. ``CompletionFormat`` and ``ChatFormat`` share one interface:
``chunk(index, delta, choice, is_first)`` gives the stream chunk of a delta (or None when it carries nothing),
``response(choices)`` the whole non-streamed body, ``usage_chunk(choices)`` the last chunk when usage is asked for.

Prompt logprobs: completions with ``echo`` put the prompt (an ``EchoedPrompt``, recorded by
``CompletionFormat.prompt_builder``) before the completion's text, in the first chunk of a stream (as vLLM), and
with ``logprobs`` its tokens before the completion's (the first token's logprob and top logprobs null, as OpenAI's);
vLLM's ``prompt_logprobs`` field goes in each completion choice and at the top of a chat body (where vLLM puts it),
only when the request has the field. Log-probabilities of -inf are sent as -9999.0 (vLLM's JSON-safe stand-in).
"""
from collections.abc import Callable
from dataclasses import dataclass, field

from flashserve.outputs import Logprob, RequestOutput
from flashserve.server.driver import PromptItem
from flashserve.server.tools import ReplyStream, ToolPlan

MIN_LOGPROB = -9999.0


@dataclass(slots=True)
class Choice:
    """One prompt's completion so far: text, token ids, logprobs, finish reason, the prompt's token ids and its
    logprobs (None unless the engine computed them)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    prompt_token_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    def add(self, delta: RequestOutput) -> None:
        """Append a step's delta."""
        completion = delta.outputs[0]
        self.text += completion.text
        self.token_ids.extend(completion.token_ids)
        self.logprobs.extend(completion.logprobs or ())
        self.finish_reason = completion.finish_reason
        self.num_prompt_tokens = len(delta.prompt_token_ids)
        self.prompt_token_ids = delta.prompt_token_ids
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs


@dataclass(slots=True)
class EchoedPrompt:
    """What ``echo`` puts before a completion: the prompt's text and its first token's text (the first token has no
    logprob entry to take its text from)."""

    text: str
    first_token: str


def prompt_logprobs_body(choice: Choice, num_top: int | None = None) -> list[dict | None]:
    """vLLM's ``prompt_logprobs`` in JSON: per prompt token null (the first) or {token id: {logprob, rank,
    decoded_token}} of the token and of the ``num_top`` most likely ones (every entry when None)."""
    body = []
    for token_id, entries in zip(choice.prompt_token_ids, choice.prompt_logprobs):
        body.append(None if entries is None else {
            str(entry_id): {"logprob": max(entry.logprob, MIN_LOGPROB), "rank": entry.rank,
                            "decoded_token": entry.decoded_token}
            for entry_id, entry in entries.items() if num_top is None or entry_id == token_id or entry.rank <= num_top})
    return body


def usage(choices: list[Choice], n: int = 1) -> dict:
    """OpenAI's ``usage``: prompt, completion and total token counts over all choices; with ``n`` completions per
    prompt (choices prompt-major) each prompt counts once."""
    prompt_tokens = sum(choice.num_prompt_tokens for choice in choices[::n])
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
                 include_usage: bool = False, n: int = 1):
        self.response_id = response_id
        self.created = created
        self.model = model
        self.num_top_logprobs = num_top_logprobs
        self.include_usage = include_usage
        self.n = n  # completions per prompt: choice i * n + j is completion j of prompt i

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
        return dict(self._body(self.chunk_object_name, []), usage=usage(choices, self.n))


class CompletionFormat(_Format):
    """``/v1/completions`` bodies (``object`` "text_completion"; logprobs as tokens, token_logprobs,
    top_logprobs and text_offset, offsets counted from the start of the choice's text, the echoed prompt's included,
    in units of the tokens' texts each decoded on its own).

    With ``echo``, the prompts must come from ``prompt_builder``, which records each one's ``EchoedPrompt``;
    ``num_prompt_logprobs`` is the request's ``prompt_logprobs`` field (the choices then carry vLLM's
    ``prompt_logprobs``).
    """

    object_name = chunk_object_name = "text_completion"

    def __init__(self, response_id: str, created: int, model: str, num_top_logprobs: int | None,
                 include_usage: bool = False, echo: bool = False, num_prompt_logprobs: int | None = None,
                 n: int = 1):
        super().__init__(response_id, created, model, num_top_logprobs, include_usage, n)
        self.echo: list[EchoedPrompt] | None = [] if echo else None
        self.num_prompt_logprobs = num_prompt_logprobs
        self._stream_offsets: dict[int, int] = {}

    def prompt_builder(self, prompts: list[PromptItem]) -> Callable[[object], list[PromptItem]]:
        """The prompt builder ``build(tokenizer)`` of ``prompts``; with ``echo`` it tokenizes them and records each
        one's ``EchoedPrompt`` (a token-id prompt's text is its decoding, as in vLLM)."""
        def build(tokenizer) -> list[PromptItem]:
            if self.echo is None:
                return prompts
            items = []
            for text, token_ids in prompts:
                token_ids = tokenizer.encode(text) if token_ids is None else token_ids
                self.echo.append(EchoedPrompt(tokenizer.decode(token_ids) if text is None else text,
                                              tokenizer.decode(token_ids[:1])))
                items.append((text, token_ids))
            return items

        return build

    def _choice(self, index: int, choice: Choice, text: str, token_ids: list[int], logprobs: list | None,
                echoes: bool, text_offset: int) -> dict:
        """A choice body of ``text`` and its tokens, after the echoed prompt when ``echoes``; the logprobs' text
        offsets start at ``text_offset``, and the offset after them is kept for the next chunk of a stream."""
        pairs = list(zip(token_ids, logprobs or ()))
        if echoes:
            text = self.echo[index // self.n].text + text
            if self.num_top_logprobs is not None:
                pairs = list(zip(choice.prompt_token_ids, choice.prompt_logprobs)) + pairs
        body = {"index": index, "text": text, "logprobs": None, "finish_reason": choice.finish_reason}
        if self.num_top_logprobs is not None:
            first_token = self.echo[index // self.n].first_token if echoes else ""
            body["logprobs"], self._stream_offsets[index] = self._logprobs(pairs, first_token, text_offset)
        return body

    def _logprobs(self, pairs: list[tuple[int, dict[int, Logprob] | None]], first_token: str,
                  text_offset: int) -> tuple[dict, int]:
        """OpenAI's logprobs object of (token id, logprob entries) pairs, and the text offset after them; entries
        None is the first prompt token (text ``first_token``), which nothing scores."""
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        for token_id, entries in pairs:
            if entries is None:
                text, logprob, top = first_token, None, None
            else:
                text, logprob = entries[token_id].decoded_token, max(entries[token_id].logprob, MIN_LOGPROB)
                top = {entry.decoded_token: max(entry.logprob, MIN_LOGPROB)
                       for entry in _ranked(entries, self.num_top_logprobs)}
            tokens.append(text)
            token_logprobs.append(logprob)
            top_logprobs.append(top)
            offsets.append(text_offset)
            text_offset += len(text)
        return ({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                 "text_offset": offsets}, text_offset)

    def chunk(self, index: int, delta: RequestOutput, choice: Choice, is_first: bool) -> dict | None:
        """The chunk of ``delta`` (already added to ``choice``); None when it has no text, tokens or end (the
        first chunk of an echo always has the prompt)."""
        completion = delta.outputs[0]
        echoes = is_first and self.echo is not None
        if not (echoes or completion.text or completion.token_ids or completion.finish_reason):
            return None
        return self._chunk_body([self._choice(index, choice, completion.text, completion.token_ids,
                                              completion.logprobs, echoes, self._stream_offsets.get(index, 0))])

    def response(self, choices: list[Choice]) -> dict:
        """The non-streamed body."""
        bodies = []
        for index, choice in enumerate(choices):
            body = self._choice(index, choice, choice.text, choice.token_ids, choice.logprobs,
                                self.echo is not None, 0)
            if self.num_prompt_logprobs is not None:
                body["prompt_logprobs"] = prompt_logprobs_body(choice, self.num_prompt_logprobs)
            bodies.append(body)
        return dict(self._body(self.object_name, bodies), usage=usage(choices, self.n))


class ChatFormat(_Format):
    """``/v1/chat/completions`` bodies (``object`` "chat.completion" / "chat.completion.chunk"; logprobs as
    ``{"content": [{token, logprob, bytes, top_logprobs}]}``; the first chunk of a choice carries the role). With a
    ``ToolPlan`` (``flashserve.server.tools``), messages and deltas carry the reply's ``tool_calls``."""

    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def __init__(self, response_id: str, created: int, model: str, num_top_logprobs: int | None,
                 include_usage: bool = False, n: int = 1, tools: ToolPlan | None = None):
        super().__init__(response_id, created, model, num_top_logprobs, include_usage, n)
        self.tools = tools if tools is not None and tools.mode != "none" else None
        self._streams: dict[int, ReplyStream] = {}

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
        content, calls, finish_reason = completion.text, [], completion.finish_reason
        if self.tools is not None:
            stream = self._streams.setdefault(index, self.tools.stream())
            content, calls = stream.feed(completion.text, finish_reason is not None)
            content = content or None  # OpenAI's tool-call deltas carry null content
            finish_reason = stream.finish_reason(finish_reason)
        message = {"role": "assistant", "content": content} if is_first else {"content": content}
        if calls:
            message["tool_calls"] = calls
        logprobs = self._logprobs(completion.token_ids, completion.logprobs or [])
        return self._chunk_body([{"index": index, "delta": message, "logprobs": logprobs,
                                  "finish_reason": finish_reason}])

    def response(self, choices: list[Choice]) -> dict:
        """The non-streamed body; vLLM's ``prompt_logprobs`` at its top when the request asked for them."""
        bodies = []
        for index, choice in enumerate(choices):
            message, finish_reason = {"role": "assistant", "content": choice.text}, choice.finish_reason
            if self.tools is not None:
                message, finish_reason = self.tools.message(choice.text, finish_reason)
            bodies.append({"index": index, "message": message,
                           "logprobs": self._logprobs(choice.token_ids, choice.logprobs),
                           "finish_reason": finish_reason})
        body = self._body(self.object_name, bodies)
        if choices and choices[0].prompt_logprobs is not None:
            body["prompt_logprobs"] = prompt_logprobs_body(choices[0])
        return dict(body, usage=usage(choices, self.n))


def _token_logprob(entry: Logprob) -> dict:
    """A chat logprob entry: the token's text, its log-probability and its UTF-8 bytes."""
    return {"token": entry.decoded_token, "logprob": max(entry.logprob, MIN_LOGPROB),
            "bytes": list(entry.decoded_token.encode())}
