"""Turns each sampling request's logits into its next token, with vLLM's semantics for every option.

Order: the logits enter in ``Sampler.__call__`` (where a structured-output mask belongs, first of all), then
``logit_bias``, penalties (``PenaltyState``: repetition over prompt + output tokens, presence and frequency over
output tokens, from counts kept on the device), min_tokens (EOS and stop tokens masked); greedy rows take the
argmax; the other rows are divided by their temperature, filtered by top-k, top-p and min-p, and sampled by the
exponential race ``argmax(p / q)``, q ~ Exp(1) — equivalent to drawing from ``p`` — without sorting the vocabulary
(``flashserve.kernels.nucleus``). A request with a seed draws its q from its own ``torch.Generator``, one row of
``vocab_size`` draws per token, so its tokens do not depend on the rest of the batch or on its position in it;
requests without a seed share the engine's generator, whose draws for a step form one (rows, vocab) block.

On CUDA the q are not materialised: the kernels compute, at the positions they need, exactly the draws that
``exponential_`` would have written (same seeds, same outputs as drawing them), and advance each generator as that
call would; the engine checks once at start-up that the computed draws equal torch's and otherwise draws them
(``Sampler.computes_noise``). On CPU they are drawn. Nothing waits for the device except the final read of the
token ids (and the rare sort fallback of ``nucleus.sample``).

Log-probabilities, when asked for, are those of the model's distribution (log-softmax of the raw logits, before
penalties, temperature and filtering), as in vLLM v1.
"""
import logging

import torch

from flashserve.engine.penalties import PenaltyState
from flashserve.engine.request import Request
from flashserve.kernels import nucleus, philox, race
from flashserve.kernels._launch import upload
from flashserve.kernels.reference import sampling as reference
from flashserve.outputs import Logprob

logger = logging.getLogger(__name__)


class Sampler:
    """Samples the next token of a batch of requests.

    Args:
        device: where the logits live.
        seed: seed of the generator shared by requests without their own seed.

    Attributes:
        penalties: the device-side token counts of the requests that use penalties (``release`` them when a
            request ends).
        sort_free: whether sampling takes the sort-free kernels (on CUDA only once a start-up check found them to
            agree with the sort there; otherwise the sort, as before).
        computes_noise: whether the race computes torch's Exp(1) draws in its kernels (CUDA, once checked) rather
            than drawing them.
    """

    def __init__(self, device: torch.device, seed: int = 0):
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.penalties = PenaltyState(self.device)
        self.sort_free = self.computes_noise = False
        if self.device.type != "cuda":
            self.sort_free = True
        else:
            try:
                self.sort_free = nucleus.agrees_with_the_sort(self.device)
                self.computes_noise = self.sort_free and philox.reproduces_torch_exponential(self.device)
            except Exception as error:  # a kernel that does not compile here must not stop the engine
                logger.warning("the sampling kernels failed on this GPU (%s)", error)
            if not self.sort_free:
                logger.warning("the sort-free sampler disagrees with the sort on this GPU: sampling by the sort")
            elif not self.computes_noise:
                logger.warning("the sampling kernels do not reproduce torch's exponential_ on this GPU: drawing the "
                               "noise instead (same outputs, slower)")
        self._layouts: dict[int, tuple[int, int]] = {}

    def release(self, request_id: str) -> None:
        """Forget what the sampler keeps for a request that ended."""
        self.penalties.release(request_id)

    def __call__(self, logits: torch.Tensor, requests: list[Request],
                 eos_token_ids: list[int]) -> tuple[list[int], list[dict[int, Logprob] | None]]:
        """``sample``, with the token ids read back as a list (this waits for the device)."""
        tokens, logprob_list = self.sample(logits, requests, eos_token_ids)
        return tokens.tolist(), logprob_list

    def sample(self, logits: torch.Tensor, requests: list[Request],
               eos_token_ids: list[int]) -> tuple[torch.Tensor, list[dict[int, Logprob] | None]]:
        """Sample one token per row.

        Args:
            logits: (N, vocab) float32, row ``i`` for ``requests[i]``; used as scratch (modified in place).
            requests: the sampling requests (their ``token_ids`` hold prompt + output so far).
            eos_token_ids: the model's EOS ids (masked while ``min_tokens`` is not reached unless ``ignore_eos``).

        Returns:
            The sampled token ids, (N,) int64 on the device (nothing waits for them unless logprobs are asked
            for), and per row None or {token id: Logprob (logprob and rank; no text)} for the sampled token and
            the top ``params.logprobs`` tokens.
        """
        params = [request.params for request in requests]
        want_logprobs = any(p.logprobs is not None for p in params)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        _apply_logit_bias(logits, params)
        penalized = self.penalties.apply(logits, requests)
        _apply_min_tokens(logits, requests, eos_token_ids)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if not random_rows:
            tokens = logits.argmax(dim=-1)
        elif len(random_rows) == len(requests):
            tokens = self._sample(logits, random_rows, requests)
        else:
            tokens = logits.argmax(dim=-1)
            tokens[upload(random_rows, torch.int64, self.device)] = self._sample(logits, random_rows, requests)
        self.penalties.record(requests, penalized, tokens)
        logprob_list: list[dict[int, Logprob] | None] = [None] * len(requests)
        if raw_logprobs is not None:
            token_list = tokens.tolist()
            rows = [i for i, p in enumerate(params) if p.logprobs is not None]
            dicts = logprob_dicts(raw_logprobs[rows] if len(rows) < len(requests) else raw_logprobs,
                                  [token_list[i] for i in rows], [params[i].logprobs for i in rows])
            for i, entry in zip(rows, dicts):
                logprob_list[i] = entry
        return tokens, logprob_list

    def _sample(self, logits: torch.Tensor, rows: list[int], requests: list[Request]) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p and the race for ``rows`` of ``logits``; returns (len(rows),) ids."""
        vocab = logits.shape[1]
        sampled = [requests[i] for i in rows]
        params = [r.params for r in sampled]
        # one upload; each option a contiguous row of it (the kernels read them as dense vectors)
        temperature, top_k, top_p, min_p = upload([[p.temperature for p in params], [p.top_k for p in params],
                                                   [p.top_p for p in params], [p.min_p for p in params]],
                                                  torch.float32, self.device)
        top_k = top_k.long()
        truncated = [truncates(p, vocab) for p in params]
        if not self.sort_free:
            return reference.sample_sorted(logits[rows], temperature, top_k, top_p, min_p,
                                           self._draw_noise(sampled, vocab))
        if self.computes_noise:
            stream_rows = self.stream_rows(sampled, vocab)
            shared = None if all(truncated) else race.shared_stream(  # the dense race of untruncated rows uses it
                stream_rows, [r.generator is None for r in sampled], self.device)
            noise = {"streams": upload(stream_rows, torch.int64, self.device), "shared": shared}
        else:
            noise = {"noise": self._draw_noise(sampled, vocab)}
        return nucleus.sample(logits, rows, temperature, top_k, top_p, min_p, truncated, **noise)

    def _draw_noise(self, requests: list[Request], vocab: int) -> torch.Tensor:
        """(R, vocab) Exp(1) draws: one block from the shared generator for the rows without a seed, one row from
        its own generator for each seeded row."""
        shared_rows = [i for i, r in enumerate(requests) if r.generator is None]
        shape = (len(requests), vocab)
        if len(shared_rows) == len(requests):
            return torch.empty(shape, device=self.device).exponential_(generator=self.generator)
        noise = torch.empty(shape, device=self.device)
        if shared_rows:
            noise[shared_rows] = torch.empty(len(shared_rows), vocab, device=self.device).exponential_(
                generator=self.generator)
        for i, request in enumerate(requests):
            if request.generator is not None:
                noise[i].exponential_(generator=request.generator)
        return noise

    def stream_rows(self, requests: list[Request], vocab: int) -> list[list[int]]:
        """The Philox streams (``philox.exponential_at``) of the draws ``_draw_noise`` would make, as R host rows
        of [seed, counter, base, stride], every generator advanced past them."""
        num_shared = sum(1 for r in requests if r.generator is None)
        shared_seed = shared_counter = shared_stride = 0
        if num_shared:
            shared_seed, shared_counter, shared_stride = self._claim(self.generator, num_shared * vocab)
        rows, position = [], 0
        for request in requests:
            if request.generator is None:
                rows.append([shared_seed, shared_counter, position * vocab, shared_stride])
                position += 1
            else:
                seed, counter, stride = self._claim(request.generator, vocab)
                rows.append([seed, counter, 0, stride])
        return rows

    def _claim(self, generator: torch.Generator, numel: int) -> tuple[int, int, int]:
        """(seed as int64, Philox counter, thread stride) of an ``exponential_`` call of ``numel`` draws from
        ``generator``, whose offset is advanced as that call would."""
        layout = self._layouts.get(numel)
        if layout is None:
            layout = self._layouts[numel] = philox.torch_stream_layout(numel, self.device)
        stride, increment = layout
        offset = generator.get_offset()
        generator.set_offset(offset + increment)
        seed = generator.initial_seed()
        return seed - (1 << 64) if seed >= 1 << 63 else seed, offset // 4, stride


def truncates(params, vocab: int) -> bool:
    """Whether ``params`` (SamplingParams) keep only part of a ``vocab``-token distribution by top-k or top-p: the
    rows whose sort-free sampling may fall back to the sort."""
    return (params.uses_top_k and params.top_k < vocab) or params.top_p < 1.0


def logprob_dicts(logprobs: torch.Tensor, token_ids: list[int], num_top: list[int]) -> list[dict[int, Logprob]]:
    """Per row of ``logprobs`` (N, vocab): {token id: Logprob} of ``token_ids[i]`` and of the row's ``num_top[i]``
    most likely tokens. A token's rank is 1 + the number of tokens strictly more likely; the top tokens are ranked
    by their order. The results reach the host in one transfer per tensor, whatever N is."""
    if not token_ids:
        return []
    chosen = logprobs.gather(1, upload(token_ids, torch.int64, logprobs.device).unsqueeze(1))
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


def _apply_logit_bias(logits: torch.Tensor, params: list) -> None:
    """Add each row's ``logit_bias`` to ``logits`` in place, in one indexed add."""
    rows, columns, biases = [], [], []
    for row, row_params in enumerate(params):
        if row_params.logit_bias:
            rows += [row] * len(row_params.logit_bias)
            columns += list(row_params.logit_bias)
            biases += list(row_params.logit_bias.values())
    if rows:
        device = logits.device
        index = (upload(rows, torch.int64, device), upload(columns, torch.int64, device))
        logits.index_put_(index, upload(biases, logits.dtype, device), accumulate=True)


def _apply_min_tokens(logits: torch.Tensor, requests: list[Request], eos_token_ids: list[int]) -> None:
    """Mask, in place and in one indexed write, EOS and stop tokens of requests below ``min_tokens``."""
    rows, columns = [], []
    vocab = logits.shape[1]
    for i, request in enumerate(requests):
        params = request.params
        if request.num_output_tokens >= params.min_tokens:
            continue
        banned = [t for t in list(params.stop_token_ids) + ([] if params.ignore_eos else list(eos_token_ids))
                  if t < vocab]
        rows += [i] * len(banned)
        columns += banned
    if rows:
        device = logits.device
        logits[upload(rows, torch.int64, device), upload(columns, torch.int64, device)] = float("-inf")
