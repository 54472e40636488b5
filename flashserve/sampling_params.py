"""How one request is sampled and when it stops: vLLM's ``SamplingParams`` names and meanings."""
import dataclasses
import json
import math
from dataclasses import dataclass, field

GREEDY_TEMPERATURE = 1e-5
MAX_LOGIT_BIAS = 100.0
_SEED_STRIDE = 0x9E3779B97F4A7C15  # an odd 64-bit constant: copy j of a seeded request draws from seed + j * stride


@dataclass(slots=True)
class StructuredOutputsParams:
    """A constraint on the output (vLLM's names): exactly one of the fields is set.

    The output is decoded under a grammar (``flashserve.engine.structured_outputs``, built on xgrammar) so that
    it always matches; the request ends ("stop") when the grammar is complete. Only the shape of the values is
    checked here; an invalid schema, regex or grammar is a ValueError naming the field when the request is added.

    Attributes:
        json: a JSON schema (a dict, or its JSON text): the output is one JSON value valid under it, written
            compactly (``", "`` and ``": "`` separators, no other whitespace; no properties beyond the schema's).
        regex: the output matches this regular expression entirely.
        choice: the output is exactly one of these strings.
        grammar: an EBNF grammar (xgrammar's / GBNF dialect, start rule ``root``).
        json_object: the output is any JSON object (OpenAI's ``response_format: {"type": "json_object"}``).
    """

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        if self.json_object is not False:
            if self.json_object is not True:
                raise ValueError(f"structured_outputs.json_object must be a bool, got {self.json_object!r}")
            given.append("json_object")
        if len(given) != 1:
            raise ValueError("structured_outputs must set exactly one of json, regex, choice, grammar and "
                             f"json_object, got {given or 'none'}")
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    schema = json.loads(self.json)
                except ValueError as error:
                    raise ValueError(f"structured_outputs.json is not valid JSON: {error}") from None
            else:
                schema = self.json
            if not isinstance(schema, (dict, bool)):
                raise ValueError(f"structured_outputs.json must be a JSON schema (an object), got {self.json!r}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string, got {value!r}")
        if self.choice is not None and (not isinstance(self.choice, (list, tuple)) or not self.choice
                                        or any(not isinstance(c, str) or not c for c in self.choice)):
            raise ValueError(f"structured_outputs.choice must be a non-empty list of non-empty strings, got "
                             f"{self.choice!r}")

    @property
    def kind(self) -> str:
        """The field that is set: "json", "regex", "choice", "grammar" or "json_object"."""
        if self.json_object:
            return "json_object"
        return next(name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None)

    @property
    def key(self) -> tuple[str, str]:
        """(kind, text) identifying the grammar: equal keys share one compiled grammar. A schema's key keeps its
        property order (the output follows it)."""
        kind = self.kind
        if kind == "json_object":
            return kind, ""
        value = getattr(self, kind)
        return kind, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


@dataclass(slots=True)
class SamplingParams:
    """Sampling and stopping options of one request.

    Attributes:
        n: completions per prompt (>= 1). ``LLM.generate`` and the server run each as a request of its own
            (``copies``); ``LLMEngine.add_request`` itself takes n = 1.
        temperature: 0 is exact greedy (argmax), and so is any temperature below ``GREEDY_TEMPERATURE`` (1e-5, as in
            vLLM); otherwise logits are divided by it before sampling.
        top_p: nucleus sampling, keep the smallest set of tokens whose probability mass reaches ``top_p``; in (0, 1].
        top_k: keep the ``top_k`` most likely tokens; 0 or -1 disables.
        min_p: drop tokens whose probability is below ``min_p`` times the largest one; in [0, 1].
        seed: a per-request random seed: the request then samples the same tokens whatever else is in the batch.
        max_tokens: the most tokens to generate (>= 1); None generates until a stop condition or ``max_model_len``.
            0 is allowed together with ``prompt_logprobs``: the request only scores its prompt (it finishes after
            the prefill with finish_reason "length" and no tokens).
        min_tokens: EOS and ``stop_token_ids`` cannot be sampled, and stop strings do not stop, before this many.
        stop: strings that end generation when they appear in the output text; cut from the text unless
            ``include_stop_str_in_output``.
        stop_token_ids: token ids that end generation (kept in ``token_ids``; special ones are not in the text).
        ignore_eos: keep generating past the model's EOS tokens.
        include_stop_str_in_output: keep the matched stop string at the end of the text.
        repetition_penalty: > 0; logits of tokens seen in the prompt or output are divided by it when positive and
            multiplied by it when negative (1 disables).
        presence_penalty: subtracted once from the logit of every token already generated (in [-2, 2]).
        frequency_penalty: subtracted from a token's logit once per time it was generated (in [-2, 2]).
        logprobs: None, or N >= 0: return the log-probability of each sampled token and of the N most likely ones.
        prompt_logprobs: None, or N >= 0: return, for every prompt token after the first, its log-probability given
            the tokens before it and the N most likely tokens at its position (``RequestOutput.prompt_logprobs``).
            Such a request does not read the prefix cache (as in vLLM): every prompt position is computed.
        skip_special_tokens: leave special tokens out of the text.
        logit_bias: {token id: bias in [-100, 100]} added to those logits before anything else (penalties,
            temperature, filtering); logprobs stay those of the model.
        detokenize: turn the output into text (and set each logprob's ``decoded_token``); False returns token ids
            only (the text stays empty), for a caller that detokenizes elsewhere, as the server does outside the
            engine thread. Stop strings need the text: with ``stop`` set it must stay True.
        structured_outputs: a ``StructuredOutputsParams`` constraining the output (JSON schema, regex, choice,
            grammar); tokens the grammar does not allow are masked before sampling, so the logprobs of such a
            request are those of the constrained distribution. Not combinable with ``min_tokens`` (the grammar
            decides where the output ends).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    detokenize: bool = True
    structured_outputs: StructuredOutputsParams | None = None
    stop_strings: tuple[str, ...] = field(init=False, repr=False, default=())

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in ("n", "top_k", "min_tokens"):
            _check_integer(name, getattr(self, name))
        for name in ("seed", "max_tokens", "logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _check_integer(name, getattr(self, name))
        if self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= -1 (0 or -1 disables), got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.max_tokens is not None and self.max_tokens < (0 if self.prompt_logprobs is not None else 1):
            raise ValueError(f"max_tokens must be None or an integer >= 1 (0 only with prompt_logprobs), got "
                             f"{self.max_tokens}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be None or an integer >= 0, got {getattr(self, name)!r}")
        if self.stop is not None and not isinstance(self.stop, (str, list, tuple)):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        self.stop_strings = tuple(stop)
        if not isinstance(self.detokenize, bool):
            raise ValueError(f"detokenize must be True or False, got {self.detokenize!r}")
        if stop and not self.detokenize:
            raise ValueError("stop strings need the text: detokenize must be True when stop is set")
        if self.stop_token_ids is not None and not isinstance(self.stop_token_ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of non-negative integers, got {self.stop_token_ids!r}")
        stop_ids = list(self.stop_token_ids or [])
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in stop_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        self.stop_token_ids = stop_ids
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias must be a dict of token id -> bias, got {self.logit_bias!r}")
            for token_id, bias in self.logit_bias.items():
                if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
                    raise ValueError(f"logit_bias keys must be non-negative token ids, got {token_id!r}")
                if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -MAX_LOGIT_BIAS <= bias \
                        <= MAX_LOGIT_BIAS:
                    raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {bias!r} for token "
                                     f"{token_id}")
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise ValueError("structured_outputs must be a StructuredOutputsParams, got "
                                 f"{type(self.structured_outputs).__name__}")
            if self.min_tokens:
                raise ValueError("min_tokens cannot be combined with structured_outputs (the grammar decides where "
                                 "the output ends)")

    def check_vocabulary(self, vocab_size: int) -> None:
        """ValueError (starting with "logit_bias") when ``logit_bias`` names a token outside [0, vocab_size)."""
        if self.logit_bias and max(self.logit_bias) >= vocab_size:
            raise ValueError(f"logit_bias has token id {max(self.logit_bias)}, outside the vocabulary "
                             f"[0, {vocab_size})")

    def copies(self) -> list["SamplingParams"]:
        """The ``n`` single-completion requests these parameters stand for: n = 1 each; with a seed, copy ``j``
        draws from its own seed (copy 0 from ``seed`` itself), so the n samples differ and are reproducible."""
        if self.n == 1:
            return [self]
        result = []
        for index in range(self.n):
            seed = None if self.seed is None else (self.seed + index * _SEED_STRIDE) % (1 << 64)
            result.append(dataclasses.replace(self, n=1, seed=seed))
        return result

    @property
    def greedy(self) -> bool:
        """Whether the request takes the argmax (temperature 0, or below ``GREEDY_TEMPERATURE``)."""
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def uses_penalties(self) -> bool:
        """Whether any repetition, presence or frequency penalty is active."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def uses_top_k(self) -> bool:
        """Whether top-k filtering is active."""
        return self.top_k > 0


def _check_integer(name: str, value) -> None:
    """ValueError naming ``name`` unless ``value`` is an int (bools are not)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
