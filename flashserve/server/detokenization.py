"""Detokenization for the server, outside the engine thread.

The engine thread must only step: the server's requests reach the engine with ``detokenize=False`` and no stop
strings, and each step's token ids are turned into text here, on the event loop's side, while the GPU already runs
the next step. Stop strings are found here too, token by token with the engine's own ``OutputText`` (so the text,
the tokens kept and the finish reason are exactly what ``LLM.generate`` gives); a request that hits one is finished
here and aborted in the engine, whose tokens sampled after the stop are dropped.
"""
import dataclasses

from transformers import AutoTokenizer

from flashserve.config import Config
from flashserve.engine.detokenizer import OutputText, TokenTexts
from flashserve.engine.token_bytes import token_bytes
from flashserve.outputs import CompletionOutput, RequestOutput
from flashserve.sampling_params import SamplingParams


class ServerDetokenizer:
    """A tokenizer of its own (never shared with another thread) and the token texts it has decoded.

    Args:
        config: the engine's configuration (the tokenizer comes from ``config.tokenizer or config.model``).
    """

    def __init__(self, config: Config):
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model, local_files_only=True)
        self.token_texts = TokenTexts(self.tokenizer)
        token_bytes(self.tokenizer)  # the detokenizer's byte table, read now rather than on the first request

    def start(self, prompt_token_ids: list[int], params: SamplingParams) -> "RequestDetokenizer":
        """The detokenizer of one request about to be added with ``params`` (its ``engine_params`` go to the
        engine). Cheap, and it does not touch the tokenizer: the engine thread calls it as it adds the request."""
        return RequestDetokenizer(self, prompt_token_ids, params)


class RequestDetokenizer:
    """Turns one request's engine outputs (token ids only) into the outputs the engine would give with text.

    Attributes:
        engine_params: what the engine runs the request with: ``params`` without stop strings and text.
        finished: whether the request has delivered its last output (outputs after that are ignored).
    """

    def __init__(self, owner: ServerDetokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self._owner = owner
        self._params = params
        self._text: OutputText | None = None  # made by the first ``process``: the tokenizer is the event loop's
        self._token_ids = list(prompt_token_ids)
        self._num_prompt_tokens = len(prompt_token_ids)
        self.engine_params = dataclasses.replace(params, stop=None, detokenize=False)
        self.finished = False

    def process(self, output: RequestOutput) -> tuple[RequestOutput, bool]:
        """The output with its text (and the texts of its logprob tokens), and whether the request was finished
        here by a stop string while the engine still runs it (the caller then aborts it in the engine)."""
        if self._text is None:
            self._text = OutputText(self._owner.tokenizer, self._token_ids, self._params)
        completion = output.outputs[0]
        new_tokens = completion.token_ids
        finish_reason, stop_reason = completion.finish_reason, completion.stop_reason
        kept = len(new_tokens)
        for index, token_id in enumerate(new_tokens):
            self._token_ids.append(token_id)
            is_last = index == len(new_tokens) - 1
            stop_string = self._text.add(self._token_ids, len(self._token_ids) - self._num_prompt_tokens,
                                         finish_reason if is_last else None)
            if stop_string is not None:
                kept, finish_reason, stop_reason = index + 1, "stop", stop_string
                break
        finished = finish_reason is not None
        stopped_here = finished and not output.finished
        self.finished = finished
        skip_special_tokens = self._params.skip_special_tokens
        logprobs = completion.logprobs
        if logprobs is not None:
            logprobs = logprobs[:kept]
            self._owner.token_texts.fill(logprobs, skip_special_tokens)
        if output.prompt_logprobs is not None:
            self._owner.token_texts.fill(output.prompt_logprobs, skip_special_tokens)
        text = self._text.take_unsent(finished)
        result = CompletionOutput(completion.index, text, list(new_tokens[:kept]), finish_reason, logprobs,
                                  stop_reason)
        return RequestOutput(output.request_id, output.prompt, output.prompt_token_ids, [result], finished,
                             output.prompt_logprobs), stopped_here
