"""What the engine hands back: vLLM's ``RequestOutput`` and ``CompletionOutput`` names."""
from dataclasses import dataclass, field


@dataclass(slots=True)
class Logprob:
    """vLLM's ``Logprob``: one token's log-probability under the model, its rank (1 = most likely) among the whole
    vocabulary, and its text on its own."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass(slots=True)
class CompletionOutput:
    """One completion of a request.

    Attributes:
        index: the completion's index among the request's n completions (0 for n = 1).
        text: the generated text (stop string cut unless ``include_stop_str_in_output``).
        token_ids: the generated token ids (an EOS or stop token that ended generation included).
        finish_reason: "stop" (EOS, stop token or stop string), "length" (max_tokens or max_model_len), or None
            while the request runs.
        logprobs: None unless requested; else one dict per generated token mapping token id -> ``Logprob``
            (as in vLLM), holding the sampled token and the ``logprobs`` most likely tokens.
        stop_reason: what ended a "stop" completion, as in vLLM: the matched stop string, or the id of the
            ``stop_token_ids`` token; None for EOS, for "length", and while the request runs.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    stop_reason: str | int | None = None

    @property
    def finished(self) -> bool:
        """Whether this completion has ended."""
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    """The output of one request.

    From ``LLM.generate`` it is the whole completion; from ``LLMEngine.step`` it carries only what is new since the
    previous step (text, token ids and logprobs), with ``finished`` set on the last one. ``prompt_logprobs`` come
    once, on a request's first ``step`` output (vLLM v1's delta outputs do the same), and ``LLM.generate``'s
    outputs keep them.

    Attributes:
        request_id: the id given to ``add_request`` (the prompt's index for ``LLM.generate``).
        prompt: the prompt text, or None when token ids were given.
        prompt_token_ids: the prompt's token ids.
        outputs: the completions (one).
        finished: whether the request has ended.
        prompt_logprobs: None unless ``prompt_logprobs`` was asked for (and on ``step`` outputs after the first);
            else vLLM's format: one entry per prompt token, None for the first, then {token id: ``Logprob``}
            holding the prompt token and the ``prompt_logprobs`` most likely tokens at its position.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
