"""The request bodies of the OpenAI-compatible endpoints and their mapping onto ``SamplingParams``.

Field names and defaults follow OpenAI's API, plus vLLM's extra sampling fields (``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``, ``include_stop_str_in_output``,
``skip_special_tokens``, ``prompt_logprobs``); ``n`` up to 16, ``logit_bias`` (token id -> bias in [-100, 100]),
``best_of`` equal to ``n``; the output constraints of ``flashserve.server.structured`` (``response_format``,
``structured_outputs``, ``guided_*``) and, in chat, the tools of ``flashserve.server.tools``. A field the server does
not implement (``suffix``, chat ``echo``, a misspelt name, ...) is refused, never ignored: the body models forbid
extra fields and the app answers 400 naming it; so is a ``best_of`` it cannot honour (other than ``n``). ``user``
(an end-user identifier that changes no output) is accepted. Invalid values raise ``InvalidRequestError`` naming
the field, which the app turns into an HTTP 400 with an OpenAI-style error body.
"""
from pydantic import BaseModel, ConfigDict

from flashserve.sampling_params import SamplingParams, StructuredOutputsParams
from flashserve.server.errors import InvalidRequestError
from flashserve.server.structured import StructuredOutputFields
from flashserve.server.tools import ToolFields

MAX_N = 16
"""The most completions one request may ask for per prompt."""
MAX_LOGPROBS = 20
"""The most top log-probabilities a request may ask for per token (vLLM's default ``max_logprobs``)."""
SEED_RANGE = (-(1 << 63), 1 << 64)
"""Seeds torch generators accept: [-2**63, 2**64)."""


def check_text(text: str, param: str) -> None:
    """``InvalidRequestError`` on ``param`` when ``text`` cannot be encoded as UTF-8 (a lone UTF-16 surrogate such
    as ``"\\ud800"``, which JSON allows and no tokenizer accepts)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidRequestError(f"{param} is not valid Unicode text: {error.reason} at position {error.start}",
                                  param) from None


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with the token counts (and ``usage: null`` before)."""

    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _GenerationRequest(StructuredOutputFields):
    """The fields both endpoints share (the constraints of ``flashserve.server.structured`` included)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage

    def _sampling_params(self, max_tokens: int | None, max_tokens_field: str, logprobs: int | None,
                         logprobs_field: str, prompt_logprobs: int | None = None,
                         structured_outputs: StructuredOutputsParams | None = None) -> SamplingParams:
        """Build the SamplingParams; ``*_field`` name the request fields those values came from (for errors);
        ``prompt_logprobs`` is what the engine computes (the request's own field when None);
        ``structured_outputs`` the constraint (the request's constraint fields' when None)."""
        requested, field = self.structured_outputs_params()
        if structured_outputs is not None and requested is not None:
            raise InvalidRequestError(f"{field} cannot be combined with a tool_choice that constrains the output "
                                      "(required or a named function)", field)
        structured_outputs = structured_outputs or requested
        if self.seed is not None and not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]:
            raise InvalidRequestError(f"seed must be in [-2**63, 2**64), got {self.seed}", "seed")
        for stop in [self.stop] if isinstance(self.stop, str) else self.stop or []:
            check_text(stop, "stop")
        for value, field in ((logprobs, logprobs_field), (self.prompt_logprobs, "prompt_logprobs")):
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise InvalidRequestError(f"{field} must be in [0, {MAX_LOGPROBS}], got {value}", field)
        if self.prompt_logprobs is not None and self.stream:
            raise InvalidRequestError("prompt_logprobs are not available when stream is true (as in vLLM)",
                                      "prompt_logprobs")
        prompt_logprobs = self.prompt_logprobs if prompt_logprobs is None else prompt_logprobs
        if not 1 <= self.n <= MAX_N:
            raise InvalidRequestError(f"n must be in [1, {MAX_N}], got {self.n}", "n")
        logit_bias = None
        if self.logit_bias is not None:
            try:
                logit_bias = {int(token): bias for token, bias in self.logit_bias.items()}
            except ValueError:
                raise InvalidRequestError("logit_bias keys must be token ids (integers as strings), got "
                                          f"{list(self.logit_bias)}", "logit_bias") from None
        values = dict(n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                      seed=self.seed, min_tokens=self.min_tokens, stop=self.stop,
                      stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
                      include_stop_str_in_output=self.include_stop_str_in_output,
                      repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                      frequency_penalty=self.frequency_penalty, logprobs=logprobs,
                      prompt_logprobs=prompt_logprobs, skip_special_tokens=self.skip_special_tokens,
                      logit_bias=logit_bias, structured_outputs=structured_outputs)
        try:
            given = {name: value for name, value in values.items() if value is not None}
            return SamplingParams(**given, max_tokens=max_tokens)
        except ValueError as error:
            # SamplingParams' messages start with the name of the field at fault.
            name = str(error).split(" ", 1)[0]
            fields = dict({field: field for field in values}, max_tokens=max_tokens_field, logprobs=logprobs_field)
            raise InvalidRequestError(str(error), fields.get(name)) from None


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions``: ``prompt`` is a string, a list of token ids, or a list of those (a batch).

    ``echo`` puts the prompt before the completion in ``text`` and, with ``logprobs``, the prompt tokens' logprobs
    before the completion's (the first token's null). ``max_tokens: 0`` is allowed with ``echo`` or
    ``prompt_logprobs``: the prompt is scored and nothing is generated (lm-eval's loglikelihood requests).
    """

    prompt: str | list[int] | list[str | list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None

    def sampling_params(self) -> SamplingParams:
        """The request's SamplingParams; ``InvalidRequestError`` naming the field for an invalid value.

        The engine computes prompt logprobs for ``prompt_logprobs``, for ``echo`` with ``logprobs`` (as many top
        tokens as the larger asks for), and for ``echo`` with ``max_tokens: 0`` (a request that only scores its
        prompt; with neither logprobs field it asks for none beyond the prompt token's own).
        """
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError(f"best_of must equal n ({self.n}) on this server (it does not rank extra "
                                      f"samples), got {self.best_of}", "best_of")
        if self.max_tokens == 0 and not self.echo and self.prompt_logprobs is None:
            raise InvalidRequestError("max_tokens must be >= 1, or 0 with echo or prompt_logprobs (to only score "
                                      "the prompt)", "max_tokens")
        wanted = [self.prompt_logprobs] if self.prompt_logprobs is not None else []
        if self.echo and (self.logprobs is not None or self.max_tokens == 0):
            wanted.append(self.logprobs or 0)
        return self._sampling_params(self.max_tokens, "max_tokens", self.logprobs, "logprobs",
                                     max(wanted) if wanted else None)


class TextPart(BaseModel):
    """One part of a message's content given as a list; only text parts are supported."""

    model_config = ConfigDict(extra="forbid")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """One message: a role and its content (a string, a list of text parts, or null); other fields pass through to
    the chat template."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[TextPart] | None = None


class ChatCompletionRequest(_GenerationRequest, ToolFields):
    """``POST /v1/chat/completions``: the reply to ``messages``, formatted with the tokenizer's chat template
    (with the ``tools``, see ``flashserve.server.tools``).

    ``max_completion_tokens`` (OpenAI's newer name) wins over ``max_tokens``; with neither, the reply may run to
    ``max_model_len``. ``logprobs: true`` returns the sampled tokens' log-probabilities and ``top_logprobs`` the
    most likely alternatives.
    """

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def sampling_params(self, tool_constraint: StructuredOutputsParams | None = None) -> SamplingParams:
        """The request's SamplingParams (constrained by ``tool_constraint``, a ``ToolPlan``'s, when given);
        ``InvalidRequestError`` naming the field for an invalid value."""
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs to be true", "top_logprobs")
        if self.max_completion_tokens is not None:
            max_tokens, max_tokens_field = self.max_completion_tokens, "max_completion_tokens"
        else:
            max_tokens, max_tokens_field = self.max_tokens, "max_tokens"
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, max_tokens_field, logprobs, "top_logprobs",
                                     structured_outputs=tool_constraint)
