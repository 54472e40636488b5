"""``LLM``: offline batch generation, vLLM's interface over ``LLMEngine``."""
import numbers

from tqdm.auto import tqdm

from flashserve.config import Config
from flashserve.engine.llm_engine import LLMEngine
from flashserve.outputs import CompletionOutput, RequestOutput
from flashserve.sampling_params import SamplingParams


class LLM:
    """A model ready to generate.

    Args:
        model: a local checkpoint directory (nothing is ever downloaded). The other options are those of
            ``flashserve.config.Config``.

    With ``tensor_parallel_size=N > 1`` the model is split over N ranks: N - 1 worker processes are spawned
    (rank r on ``cuda:r``; gloo processes on the CPU), or, under ``torchrun``, every rank runs this program and
    ``LLM`` joins its group; then ``generate`` and ``chat`` return the outputs on rank 0 and an empty list on the
    other ranks (which run the model's steps meanwhile). ``close()`` (or dropping the LLM) stops the workers.
    """

    def __init__(self, model: str, *, tokenizer: str | None = None, dtype: str = "auto", device: str | None = None,
                 max_model_len: int | None = None, block_size: int = 16, gpu_memory_utilization: float = 0.9,
                 num_kv_blocks: int | None = None, max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
                 enable_prefix_caching: bool = True, enforce_eager: bool = False,
                 max_cudagraph_capture_size: int | None = None, seed: int = 0, tensor_parallel_size: int = 1,
                 async_scheduling: bool = True):
        config = Config(model=model, tokenizer=tokenizer, dtype=dtype, device=device, max_model_len=max_model_len,
                        block_size=block_size, gpu_memory_utilization=gpu_memory_utilization,
                        num_kv_blocks=num_kv_blocks, max_num_seqs=max_num_seqs,
                        max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=enable_prefix_caching,
                        enforce_eager=enforce_eager, max_cudagraph_capture_size=max_cudagraph_capture_size,
                        seed=seed, tensor_parallel_size=tensor_parallel_size, async_scheduling=async_scheduling)
        self.engine = LLMEngine(config)
        self._next_id = 0

    def get_tokenizer(self):
        """The Hugging Face tokenizer."""
        return self.engine.tokenizer

    def generate(self, prompts: str | dict | list[str] | list[dict] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate a completion for every prompt; outputs come in the order of ``prompts``.

        Args:
            prompts: a string, a list of strings, or a list of token-id lists (a single list of ints is one prompt);
                vLLM's prompt dicts too, alone or in a list: {"prompt": text} or {"prompt_token_ids": ids}.
            sampling_params: one SamplingParams for all prompts, or one per prompt; None is ``SamplingParams()``.
            use_tqdm: show a progress bar with prefill and decode throughput.

        Raises ValueError, before anything runs, for any invalid prompt (see ``LLMEngine.add_request``).
        """
        def work():
            items = _normalize_prompts(prompts)
            return self._run(items, _params_per_prompt(sampling_params, len(items)), use_tqdm)
        return self._as_driver(work)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {"role", "content"} dicts) or to a list of them,
        formatted with the tokenizer's chat template (with the generation prompt); one SamplingParams for all
        conversations or one per conversation."""
        return self._as_driver(lambda: self._chat(messages, sampling_params, use_tqdm))

    def _chat(self, messages, sampling_params, use_tqdm: bool) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tokenizer = self.engine.tokenizer
        if tokenizer.chat_template is None:
            raise ValueError("the tokenizer has no chat template (tokenizer_config.json has no chat_template): "
                             "format the conversation yourself and call generate")
        items = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
            items.append((text, tokenizer.encode(text, add_special_tokens=False)))
        return self._run(items, _params_per_prompt(sampling_params, len(items)), use_tqdm)

    def _as_driver(self, work) -> list[RequestOutput]:
        """``work()`` on rank 0 (telling torchrun's other ranks when it is over); elsewhere follow rank 0's steps
        until then and return []. RuntimeError once a tensor-parallel LLM is closed."""
        if self.engine.parallel is not None and self.engine.parallel.closed:
            raise RuntimeError("this LLM is closed (its tensor-parallel workers have stopped)")
        if not self.engine.is_driver:
            self.engine.follow()
            return []
        try:
            return work()
        finally:
            self.engine.end_call()

    def close(self) -> None:
        """Stop the tensor-parallel workers (see ``LLMEngine.close``); the LLM cannot generate afterwards."""
        self.engine.close()

    def _run(self, items: list[tuple], params_list: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        """Queue (prompt, token ids or None) items, step until all finish, and assemble the outputs in order.

        A prompt with ``n > 1`` runs as n engine requests (``SamplingParams.copies``) whose completions are
        gathered into one RequestOutput (``outputs[j].index == j``)."""
        engine = self.engine
        ids, groups = [], []
        try:
            for (prompt, token_ids), params in zip(items, params_list):
                parent_id = str(self._next_id)
                self._next_id += 1
                copies = params.copies()
                group = [parent_id] if len(copies) == 1 else [f"{parent_id}-{j}" for j in range(len(copies))]
                for request_id, copy in zip(group, copies):
                    engine.add_request(request_id, prompt, copy, prompt_token_ids=token_ids)
                    ids.append(request_id)
                groups.append((parent_id, group))
        except ValueError:
            for request_id in ids:
                engine.abort_request(request_id)
            raise
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        try:
            while engine.has_unfinished():
                for delta in engine.step():
                    _accumulate(results, delta)
                    if delta.finished:
                        bar.update(1)
                stats = engine.stats
                bar.set_postfix_str(f"prefill {stats.prefill_tokens_per_s:.0f} tok/s, "
                                    f"decode {stats.decode_tokens_per_s:.0f} tok/s", refresh=False)
        finally:
            bar.close()
            for request_id in ids:
                if request_id in engine.requests:
                    engine.abort_request(request_id)
        return [_gather(parent_id, [results[request_id] for request_id in group]) for parent_id, group in groups]

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (and the hit-rate statistics); returns True, as vLLM does on success."""
        return self.engine.reset_prefix_cache()

    def prefix_cache_stats(self) -> dict[str, float]:
        """Prefix-cache queried tokens, hit tokens and hit rate since the last reset."""
        return self.engine.prefix_cache_stats()

    @property
    def stats(self):
        """The engine's throughput statistics (``EngineStats``)."""
        return self.engine.stats


def _normalize_prompts(prompts) -> list[tuple[str | None, list[int] | None]]:
    """``generate``'s prompts -> a list of (text or None, token ids or None) items for ``LLMEngine.add_request``.

    Accepts a string, a prompt dict, one token-id list, or a list of strings, prompt dicts and token-id lists
    (numpy arrays and tensors of ids included).
    """
    if isinstance(prompts, (str, dict)):
        prompts = [prompts]
    elif hasattr(prompts, "tolist"):
        prompts = prompts.tolist()
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a string, a prompt dict, or a list of prompts, got "
                         f"{type(prompts).__name__}")
    if prompts and all(isinstance(p, numbers.Integral) for p in prompts):
        return [(None, list(prompts))]
    return [_prompt_item(prompt) for prompt in prompts]


def _prompt_item(prompt) -> tuple[str | None, list[int] | None]:
    """One prompt -> (text or None, token ids or None)."""
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        if isinstance(prompt.get("prompt"), str):
            return prompt["prompt"], None
        raise ValueError(f"a prompt dict needs a 'prompt' string or 'prompt_token_ids', got keys {sorted(prompt)}")
    if hasattr(prompt, "tolist"):
        prompt = prompt.tolist()
    if isinstance(prompt, (list, tuple)):
        return None, list(prompt)
    raise ValueError(f"each prompt must be a string, a prompt dict or a list of token ids, got "
                     f"{type(prompt).__name__}")


def _params_per_prompt(sampling_params, num_prompts: int) -> list[SamplingParams]:
    """One SamplingParams (or None: the defaults) for every prompt, or a list of one per prompt."""
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
        return [sampling_params or SamplingParams()] * num_prompts
    if not isinstance(sampling_params, (list, tuple)):
        raise ValueError(f"sampling_params must be a SamplingParams or a list of them, got "
                         f"{type(sampling_params).__name__}")
    if len(sampling_params) != num_prompts:
        raise ValueError(f"sampling_params has {len(sampling_params)} entries for {num_prompts} prompts")
    return list(sampling_params)


def _accumulate(results: dict[str, RequestOutput], delta: RequestOutput) -> None:
    """Fold a step's output into the request's whole output."""
    new = delta.outputs[0]
    whole = results.get(delta.request_id)
    if whole is None:
        completion = CompletionOutput(0, new.text, list(new.token_ids), new.finish_reason,
                                      list(new.logprobs) if new.logprobs is not None else None, new.stop_reason)
        results[delta.request_id] = RequestOutput(delta.request_id, delta.prompt, delta.prompt_token_ids,
                                                  [completion], delta.finished, delta.prompt_logprobs)
        return
    completion = whole.outputs[0]
    completion.text += new.text
    completion.token_ids.extend(new.token_ids)
    completion.finish_reason = new.finish_reason
    completion.stop_reason = new.stop_reason
    if new.logprobs is not None:
        completion.logprobs.extend(new.logprobs)
    whole.finished = delta.finished


def _gather(parent_id: str, outputs: list[RequestOutput]) -> RequestOutput:
    """The n completions of one prompt as one RequestOutput (the first copy's, renamed, with all completions)."""
    if len(outputs) == 1:
        return outputs[0]
    first = outputs[0]
    completions = []
    for index, output in enumerate(outputs):
        completion = output.outputs[0]
        completion.index = index
        completions.append(completion)
    return RequestOutput(parent_id, first.prompt, first.prompt_token_ids, completions,
                         all(output.finished for output in outputs), first.prompt_logprobs)

