"""DecodeSampling (sampling from persistent option buffers, graph-replayed on CUDA) against the eager Sampler: the
batches it takes, the same tokens for greedy, sampled, seeded and mixed batches, padding rows ignored, and the
sort fallback."""
import pytest
import torch

from flashserve import SamplingParams
from flashserve.engine.decode_sampling import DecodeSampling
from flashserve.engine.request import Request
from flashserve.engine.sampler import Sampler
from flashserve.kernels import nucleus
from flashserve.kernels.reference import sampling as reference


def _request(index, device, **options):
    params = SamplingParams(**options)
    request = Request(f"r{index}", None, [1, 2, 3], params, max_model_len=1000)
    if params.seed is not None:
        request.generator = torch.Generator(device=device).manual_seed(params.seed)
    return request


def test_supports_only_what_the_buffers_hold():
    sampler = Sampler(torch.device("cpu"))
    buffered = DecodeSampling(sampler, 8, 50, torch.device("cpu"))
    greedy = _request(0, "cpu", temperature=0)
    assert buffered.supports([greedy, greedy])
    assert not buffered.supports([greedy] * 9)  # more rows than the buffers
    for options in (dict(temperature=0, logit_bias={3: 1.0}), dict(temperature=0, presence_penalty=0.5),
                    dict(temperature=0, logprobs=2), dict(temperature=0, min_tokens=4)):
        assert not buffered.supports([greedy, _request(1, "cpu", **options)]), options
    sampled = _request(2, "cpu", temperature=0.8, top_p=0.9)
    assert not buffered.supports([greedy, sampled])  # the CPU sampler draws its noise: the eager path
    sampler.computes_noise = True
    assert buffered.supports([greedy, sampled])


def test_greedy_batch_is_the_argmax_and_padding_is_ignored():
    buffered = DecodeSampling(Sampler(torch.device("cpu")), 8, 300, torch.device("cpu"))
    logits = torch.randn(5, 300)
    requests = [_request(i, "cpu", temperature=0) for i in range(3)]
    assert buffered.sample(requests, 5, logits).tolist() == logits[:3].argmax(dim=-1).tolist()


class _FixedStreams:
    """A sampler whose rows' Philox streams are fixed (the CPU generators have no Philox offsets)."""

    sort_free = computes_noise = True

    def __init__(self, vocab):
        self.vocab = vocab

    def stream_rows(self, requests, vocab):
        return [[1000 + int(r.request_id[1:]), 4, 0, 512] for r in requests]


def test_sampled_and_mixed_rows_equal_the_kernels_on_the_same_streams():
    """Row options and streams reach the kernels from the buffers: the tokens are ``nucleus.sample``'s for the
    sampled rows (any option, a top-p row of flat logits through the sort fallback) and the argmax for the rest."""
    vocab = 400
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(7, vocab, generator=generator) * 3
    logits[5] = torch.randn(vocab, generator=generator) * 0.01  # flat: top-p falls back to the sort
    options = [dict(temperature=0), dict(temperature=0.7, top_k=20, top_p=0.8), dict(temperature=1.0, top_p=0.9),
               dict(temperature=0.8), dict(temperature=0), dict(temperature=1.0, top_p=0.95),
               dict(temperature=1.1, min_p=0.1)]
    requests = [_request(i, "cpu", **o) for i, o in enumerate(options)]
    sampler = _FixedStreams(vocab)
    buffered = DecodeSampling(sampler, 8, vocab, torch.device("cpu"))
    padded = torch.cat([logits, torch.randn(1, vocab, generator=generator)])
    got = buffered.sample(requests, 8, padded).tolist()
    rows = [i for i, o in enumerate(options) if o["temperature"] > 0]
    params = [requests[i].params for i in rows]
    column = lambda name, dtype=torch.float32: torch.tensor([getattr(p, name) for p in params], dtype=dtype)  # noqa
    streams = torch.tensor(sampler.stream_rows([requests[i] for i in rows], vocab))
    noise = reference.exponential_at(streams, torch.arange(vocab).expand(len(rows), -1))
    want = logits.argmax(dim=-1)
    want[rows] = reference.sample_sorted(logits[rows], column("temperature"), column("top_k", torch.int64),
                                         column("top_p"), column("min_p"), noise)
    assert got == want.tolist()
    truncated = [(0 < p.top_k < vocab) or p.top_p < 1 for p in params]
    direct = nucleus.sample(logits, rows, column("temperature"), column("top_k", torch.int64), column("top_p"),
                            column("min_p"), truncated, streams=streams)
    assert [got[i] for i in rows] == direct.tolist()


class _SeededStreams(_FixedStreams):
    """Fixed streams for requests with a seed; the others share one call (bases position * vocab), as the real
    sampler lays them out."""

    def stream_rows(self, requests, vocab):
        rows, position = [], 0
        for request in requests:
            if request.generator is None:
                rows.append([77, 8, position * vocab, 512])
                position += 1
            else:
                rows.append([1000 + int(request.request_id[1:]), 4, 0, 512])
        return rows


def test_option_rows_written_incrementally_equal_a_full_write():
    """Step after step (requests leaving and joining, rows turning greedy or sampled, seeded and shared rows, a
    smaller padded size, a greedy batch), the host arena that the O(changes) writes leave equals the one a fresh
    DecodeSampling writes for the same batch."""
    vocab = 300
    options = [dict(temperature=0.7, top_k=20, top_p=0.8), dict(temperature=0), dict(temperature=1.0, top_p=0.9),
               dict(temperature=0.8, seed=5), dict(temperature=1.1, min_p=0.1), dict(temperature=0.9, seed=6)]
    pool = [_request(i, "cpu", **options[i % len(options)]) for i in range(12)]
    batches = [(pool[:6], 8), (pool[:6], 8), (pool[1:7], 8), ([pool[0], pool[2], pool[8], pool[3]], 4),
               ([pool[1], pool[7]], 4), (pool[4:12], 8), (pool[4:12], 8), (pool[6:9], 4)]
    buffered = DecodeSampling(_SeededStreams(vocab), 8, vocab, torch.device("cpu"))
    fields = ("streams", "top_k", "temperature", "top_p", "min_p", "greedy", "shared_member")
    for step, (requests, padded) in enumerate(batches):
        fresh = DecodeSampling(_SeededStreams(vocab), 8, vocab, torch.device("cpu"))
        for instance in (buffered, fresh):
            instance._write_options(requests, instance.sampled_rows(requests), padded)
        for name in fields:
            assert (getattr(buffered, name).array[:padded] == getattr(fresh, name).array[:padded]).all(), (step, name)
        shared = int(fresh.num_shared.array[0])
        assert int(buffered.num_shared.array[0]) == shared, step
        assert (buffered.shared_index.array[:shared] == fresh.shared_index.array[:shared]).all(), step


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_replays_give_the_eager_samplers_tokens_on_cuda():
    """Captured graphs (two padded sizes) against the eager Sampler, step after step, seeded and shared rows,
    every option, greedy rows mixed in, a flat step that sends top-p rows to the sort fallback."""
    device = torch.device("cuda")
    vocab, sizes = 151936, [8, 48]
    eager, graphed = Sampler(device, seed=11), Sampler(device, seed=11)
    assert graphed.computes_noise, "exponential_at does not reproduce torch's exponential_ on this GPU"
    logits_buffer = torch.empty(48, vocab, device=device)
    buffered = DecodeSampling(graphed, 48, vocab, device, logits_buffer)
    buffered.capture(sizes, torch.cuda.graph_pool_handle())
    options = [dict(temperature=1.0, top_p=0.9), dict(temperature=0.7, top_k=20, top_p=0.8), dict(temperature=0.6),
               dict(temperature=1.0, min_p=0.05), dict(temperature=0), dict(temperature=1.2, top_k=50)]

    def batch(tag, count):
        return [_request(f"{tag}{i}", device, seed=i if i % 3 == 0 else None, **options[i % len(options)])
                for i in range(count)]

    generator = torch.Generator(device=device).manual_seed(5)
    for count, padded in ((41, 48), (6, 8), (3, 8)):
        batch_a, batch_b = batch("a", count), batch("b", count)
        for step, scale in enumerate((4.0, 0.02, 12.0)):
            logits = torch.randn(count, vocab, device=device, generator=generator) * scale
            logits_buffer[:count].copy_(logits)
            want, _ = eager(logits.clone(), batch_a, eos_token_ids=[0])
            got = buffered.sample(batch_b, padded).tolist()
            assert got == want, (count, step)
        greedy = [_request(f"g{i}", device, temperature=0) for i in range(count)]
        assert buffered.sample(greedy, padded).tolist() == logits_buffer[:count].argmax(dim=-1).tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_samples_from_graphs_with_the_eager_samplers_tokens(tmp_path):
    """An engine whose decode steps sample from the sampling graphs generates what one sampling eagerly does:
    greedy, shared-stream and seeded requests, every option, batches padded to captured sizes."""
    from flashserve import LLM
    from flashserve.models.checkpoint import write_random_checkpoint

    directory = write_random_checkpoint(str(tmp_path / "q"), "Qwen3ForCausalLM", seed=0)
    prompts = [[5 + i, 9, 17 + 3 * i, 4] for i in range(11)]
    options = [dict(temperature=0), dict(temperature=0.6), dict(temperature=1.0, top_p=0.9, seed=3),
               dict(temperature=0.7, top_k=20, top_p=0.8), dict(temperature=1.0, min_p=0.05, seed=4)]
    params = [SamplingParams(max_tokens=10, ignore_eos=True, **options[i % len(options)]) for i in range(11)]

    def generate(buffered: bool) -> list[list[int]]:
        llm = LLM(directory, dtype="float32", device="cuda", block_size=4, num_kv_blocks=1024, max_num_seqs=16,
                  seed=7)
        runner = llm.engine.runner
        replays = []
        if buffered:
            original = runner.decode_sampling.sample
            runner.decode_sampling.sample = lambda *args: replays.append(args[1]) or original(*args)
        else:
            runner.decode_sampling.supports = lambda requests: False
        outputs = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert not buffered or replays, "no decode step sampled from the graphs"
        return outputs

    assert generate(True) == generate(False)
