"""Turns each sampling request's logits into its next token, with vLLM's semantics for every option.

Order: ``logit_bias``, penalties (repetition over prompt + output tokens, presence and frequency over output
tokens), min_tokens (EOS and stop tokens masked), then greedy rows take the argmax; the other rows are divided by
their temperature, filtered by top-k, top-p and min-p, and sampled by the exponential race ``argmax(p / q)``,
q ~ Exp(1) — equivalent to drawing from ``p``. A request with a seed draws its q from its own ``torch.Generator``, one row of
``vocab_size`` draws per token, so its tokens do not depend on the rest of the batch or on its position in it.
Requests without a seed share the engine's generator. Common batches take short paths with the same results: all
greedy is one argmax; all sampling skips the argmax and the row gathers; no seeds draws all the noise at once.
Nothing waits for the device except the final read of the token ids.

Log-probabilities, when asked for, are those of the model's distribution (log-softmax of the raw logits, before
penalties, temperature and filtering), as in vLLM v1.
"""
import torch

from flashserve.engine.request import Request
from flashserve.outputs import Logprob


class Sampler:
    """Samples the next token of a batch of requests.

    Args:
        device: where the logits live.
        seed: seed of the generator shared by requests without their own seed.
    """

    def __init__(self, device: torch.device, seed: int = 0):
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, requests: list[Request],
                 eos_token_ids: list[int]) -> tuple[list[int], list[dict[int, Logprob] | None]]:
        """Sample one token per row.

        Args:
            logits: (N, vocab) float32, row ``i`` for ``requests[i]``.
            requests: the sampling requests (their ``token_ids`` hold prompt + output so far).
            eos_token_ids: the model's EOS ids (masked while ``min_tokens`` is not reached unless ``ignore_eos``).

        Returns:
            The sampled token ids, and per row None or {token id: Logprob (logprob and rank; no text)} for the
            sampled token and the top ``params.logprobs`` tokens.
        """
        params = [request.params for request in requests]
        want_logprobs = any(p.logprobs is not None for p in params)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        logits = _apply_logit_bias(logits, params)
        logits = self._apply_penalties(logits, requests)
        logits = self._apply_min_tokens(logits, requests, eos_token_ids)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if not random_rows:
            tokens = logits.argmax(dim=-1)
        elif len(random_rows) == len(requests):
            tokens = self._sample(logits, requests)
        else:
            tokens = logits.argmax(dim=-1)
            tokens[random_rows] = self._sample(logits[random_rows], [requests[i] for i in random_rows])
        token_list = tokens.tolist()
        logprob_list: list[dict[int, Logprob] | None] = [None] * len(requests)
        if raw_logprobs is not None:
            rows = [i for i, p in enumerate(params) if p.logprobs is not None]
            dicts = logprob_dicts(raw_logprobs[rows] if len(rows) < len(requests) else raw_logprobs,
                                  [token_list[i] for i in rows], [params[i].logprobs for i in rows])
            for i, entry in zip(rows, dicts):
                logprob_list[i] = entry
        return token_list, logprob_list

    def _apply_penalties(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Repetition, presence and frequency penalties, on the rows that use them."""
        rows = [i for i, r in enumerate(requests) if r.params.uses_penalties]
        if not rows:
            return logits
        logits = logits.clone()
        vocab = logits.shape[1]
        for i in rows:
            request = requests[i]
            params = request.params
            row = logits[i]
            if params.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(request.token_ids)), dtype=torch.long, device=logits.device)
                seen_logits = row[seen]
                row[seen] = torch.where(seen_logits > 0, seen_logits / params.repetition_penalty,
                                        seen_logits * params.repetition_penalty)
            if (params.presence_penalty != 0.0 or params.frequency_penalty != 0.0) and request.num_output_tokens:
                output = torch.tensor(request.output_token_ids, dtype=torch.long, device=logits.device)
                counts = torch.zeros(vocab, dtype=logits.dtype, device=logits.device)
                counts.scatter_add_(0, output, torch.ones_like(output, dtype=logits.dtype))
                row -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
        return logits

    def _apply_min_tokens(self, logits: torch.Tensor, requests: list[Request],
                          eos_token_ids: list[int]) -> torch.Tensor:
        """Mask EOS and stop tokens of requests that have not generated ``min_tokens`` yet."""
        cloned = False
        for i, request in enumerate(requests):
            params = request.params
            if request.num_output_tokens >= params.min_tokens:
                continue
            banned = list(params.stop_token_ids) + ([] if params.ignore_eos else list(eos_token_ids))
            banned = [t for t in banned if t < logits.shape[1]]
            if not banned:
                continue
            if not cloned:
                logits, cloned = logits.clone(), True
            logits[i, banned] = float("-inf")
        return logits

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p, then the exponential race; (R, vocab) -> (R,) token ids."""
        device = logits.device
        params = [r.params for r in requests]
        temperature = _to_device([p.temperature for p in params], logits.dtype, device)
        logits = logits / temperature.unsqueeze(1)
        if any(p.uses_top_k or p.top_p < 1.0 for p in params):
            logits = _top_k_top_p(logits, [p.top_k for p in params], [p.top_p for p in params])
        probs = torch.softmax(logits, dim=-1)
        if any(p.min_p > 0.0 for p in params):
            min_p = _to_device([p.min_p for p in params], probs.dtype, device)
            probs = probs.masked_fill(probs < min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True), 0.0)
        shared_rows = [i for i, r in enumerate(requests) if r.generator is None]
        if len(shared_rows) == len(requests):
            noise = torch.empty_like(probs).exponential_(generator=self.generator)
        else:
            noise = torch.empty_like(probs)
            if shared_rows:
                noise[shared_rows] = torch.empty(len(shared_rows), probs.shape[1], dtype=probs.dtype,
                                                 device=device).exponential_(generator=self.generator)
            for i, request in enumerate(requests):
                if request.generator is not None:
                    noise[i].exponential_(generator=request.generator)
        return (probs / noise).argmax(dim=-1)


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a device tensor, copied through pinned memory on CUDA so that the host does not wait
    for the work already queued on the device."""
    tensor = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Set to -inf the logits outside each row's top-k and outside its top-p nucleus; (R, vocab) float."""
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    k = _to_device([kk if kk > 0 else vocab for kk in top_k], torch.int64, logits.device).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    p = _to_device(top_p, logits.dtype, logits.device).unsqueeze(1)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_logits = sorted_logits.masked_fill((mass_before >= p) & (ranks > 0) & (p < 1.0), float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def logprob_dicts(logprobs: torch.Tensor, token_ids: list[int], num_top: list[int]) -> list[dict[int, Logprob]]:
    """Per row of ``logprobs`` (N, vocab): {token id: Logprob} of ``token_ids[i]`` and of the row's ``num_top[i]``
    most likely tokens. A token's rank is 1 + the number of tokens strictly more likely; the top tokens are ranked
    by their order. The results reach the host in one transfer per tensor, whatever N is."""
    if not token_ids:
        return []
    chosen = logprobs.gather(1, _to_device(token_ids, torch.int64, logprobs.device).unsqueeze(1))
    ranks = (logprobs > chosen).sum(dim=1) + 1
    most = min(max(num_top), logprobs.shape[1])
    top_values, top_indices = logprobs.topk(most, dim=1) if most > 0 else (chosen[:, :0], chosen[:, :0])
    result = []
    for token_id, value, rank, values, indices, count in zip(token_ids, chosen.squeeze(1).tolist(), ranks.tolist(),
                                                           top_values.tolist(), top_indices.tolist(), num_top):
        entry = {token_id: Logprob(value, rank)}
        for top_rank, (top_value, index) in enumerate(zip(values[:count], indices[:count]), start=1):
            entry.setdefault(index, Logprob(top_value, top_rank))
        result.append(entry)
    return result


def _apply_logit_bias(logits: torch.Tensor, params: list) -> torch.Tensor:
    """``logits`` plus each row's ``logit_bias`` (a new tensor when any row has one), in one indexed add."""
    rows, columns, biases = [], [], []
    for row, row_params in enumerate(params):
        if row_params.logit_bias:
            rows += [row] * len(row_params.logit_bias)
            columns += list(row_params.logit_bias)
            biases += list(row_params.logit_bias.values())
    if not rows:
        return logits
    device = logits.device
    index = (torch.tensor(rows, device=device), torch.tensor(columns, device=device))
    return logits.index_put(index, torch.tensor(biases, dtype=logits.dtype, device=device), accumulate=True)

