"""The sort-free sampler (flashserve.kernels.sampling / nucleus): Philox known answers, the torch-compatible
exponential stream, candidate gathering and the race against their references (Triton interpreter on CPU), the
sampler against the sort-based one with the same noise, and, on CUDA, against torch's own generator."""
import pytest
import torch

from flashserve.kernels import nucleus, philox, race, sampling, selection
from flashserve.kernels.reference import sampling as reference


def _words(*values):
    return [torch.tensor([v], dtype=torch.int64) for v in values]


@pytest.mark.parametrize("counter, key, expected", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(counter, key, expected):
    seed = torch.tensor([key[0] | (key[1] << 32)], dtype=torch.int64) if key[1] < 2 ** 31 else \
        torch.tensor([key[0] | (key[1] << 32)], dtype=torch.uint64).view(torch.int64)
    words = reference.philox4x32(seed, *_words(*counter))
    assert [int(w) for w in words] == list(expected)


def _streams(num_rows, vocab, seed=7):
    rows = [[(seed * 1000003 + r) % (1 << 62), 4 * r, r * vocab, 256 * 3] for r in range(num_rows)]
    return torch.tensor(rows, dtype=torch.int64)


@pytest.fixture
def interpret(monkeypatch):
    """Triton's interpreter on CPU tensors: the CPU run's way of testing the kernels. On a CUDA machine the kernels
    were compiled at import (no ``TRITON_INTERPRET``) and cannot take CPU tensors: the CUDA tests cover them."""
    if torch.cuda.is_available():
        pytest.skip("an interpreter test (the kernels are compiled on a CUDA machine)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("FLASHSERVE_ATTENTION_BACKEND", raising=False)


def test_exponential_kernel_matches_reference(interpret):
    streams = _streams(3, 50)
    tokens = torch.randint(0, 50, (3, 40))
    expected = reference.exponential_at(streams, tokens)
    torch.testing.assert_close(philox.exponential_at(streams, tokens), expected, rtol=2e-6, atol=0)
    assert (expected > 0).all() and 0.5 < expected.mean() < 1.5


def test_block_candidate_and_race_kernels_match_their_references(interpret, monkeypatch):
    logits = torch.randn(4, 2500) * 3
    rows = torch.tensor([3, 0, 1], dtype=torch.int64)
    temperature = torch.tensor([1.0, 0.5, 2.0])
    block_max, block_sum, sub_block_max = sampling.block_stats(logits, rows, temperature)
    ref_max, ref_sum, ref_sub_max = reference.block_stats(logits[rows], temperature, sampling.BLOCK,
                                                          sampling.BLOCK // sampling.SUB_BLOCKS)
    torch.testing.assert_close(block_max, ref_max)
    torch.testing.assert_close(block_sum, ref_sum, rtol=1e-5, atol=0)
    assert torch.equal(sub_block_max, ref_sub_max)
    row_max = block_max.amax(dim=1)
    cutoff = row_max - torch.tensor([2.0, 1.0, 30.0])  # the last row overflows 64 slots
    values, indices, count = sampling.gather_candidates(logits, rows, temperature, cutoff, sub_block_max, 64)
    ref_values, ref_indices, ref_count = reference.gather_candidates(logits[rows], temperature, cutoff, 64)
    torch.testing.assert_close(count, ref_count)
    assert int(count[2]) > 64
    for r in range(2):
        n = int(count[r])
        got = sorted(zip(indices[r, :n].tolist(), values[r, :n].tolist()))
        want = sorted(zip(ref_indices[r, :n].tolist(), ref_values[r, :n].tolist()))
        assert [i for i, _ in got] == [i for i, _ in want]
        torch.testing.assert_close(torch.tensor([v for _, v in got]), torch.tensor([v for _, v in want]))
    _check_sub_block_gathering(logits, rows, temperature, sub_block_max)
    streams = _streams(3, 2500)
    floor = row_max + torch.log(torch.tensor([0.0, 0.1, 0.0]))
    bound = torch.full((3,), float("-inf"))
    ref_best, ref_token = reference.race_blocks(logits[rows], temperature, row_max, floor, bound, streams,
                                                sampling.BLOCK)
    for group in (sampling.RACE_GROUP, 2):  # one program per row; two, the second's group cut by the row's end
        monkeypatch.setattr(sampling, "RACE_GROUP", group)
        best, token = sampling.race_blocks(logits, rows, temperature, row_max, floor, streams, block_max, bound)
        torch.testing.assert_close(best, ref_best, rtol=1e-5, atol=0)
        assert token.tolist() == ref_token.tolist()
    skipped, _ = sampling.race_blocks(logits, rows, temperature, row_max, floor, streams, block_max,
                                      torch.full((3,), float("inf")))
    assert (skipped == -1).all()
    ref_skipped, _ = reference.race_blocks(logits[rows], temperature, row_max, floor, torch.full((3,), float("inf")),
                                           streams, sampling.BLOCK)
    assert (ref_skipped == -1).all()


@pytest.mark.parametrize("interpreted", [False, True])
def test_start_up_check_agrees(interpreted, monkeypatch):
    if interpreted:
        if torch.cuda.is_available():
            pytest.skip("an interpreter test (the kernels are compiled on a CUDA machine)")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.delenv("FLASHSERVE_ATTENTION_BACKEND", raising=False)
    else:
        monkeypatch.setenv("FLASHSERVE_ATTENTION_BACKEND", "torch")
    assert nucleus.agrees_with_the_sort(torch.device("cpu"), vocab=2500)


def _params(num_rows, vocab, generator):
    temperature = torch.rand(num_rows, generator=generator) + 0.3
    top_k = torch.tensor([[0, 1, 5, 40, vocab, 0][i % 6] for i in range(num_rows)])
    top_p = torch.tensor([[0.9, 1.0, 0.5, 0.95, 0.3, 1.0][i % 6] for i in range(num_rows)])
    min_p = torch.tensor([[0.0, 0.0, 0.05, 0.0, 0.0, 0.2][i % 6] for i in range(num_rows)])
    truncated = [(0 < k < vocab) or p < 1 for k, p in zip(top_k.tolist(), top_p.tolist())]
    return temperature, top_k, top_p, min_p, truncated


@pytest.mark.parametrize("capacity", [8, 4096])
def test_sampler_equals_the_sort_based_one_with_the_same_noise(capacity):
    generator = torch.Generator().manual_seed(0)
    vocab, num_rows = 500, 24
    for trial in range(5):
        logits = torch.randn(num_rows, vocab, generator=generator) * (1 + 3 * trial)
        temperature, top_k, top_p, min_p, truncated = _params(num_rows, vocab, generator)
        noise = torch.empty(num_rows, vocab).exponential_(generator=generator)
        got = nucleus.sample(logits, list(range(num_rows)), temperature, top_k, top_p, min_p, truncated,
                             noise=noise, capacity=capacity)
        want = reference.sample_sorted(logits, temperature, top_k, top_p, min_p, noise)
        assert got.tolist() == want.tolist()


def test_sampler_takes_strided_option_vectors(interpret):
    """Per-row options given as column views of one (R, 4) tensor (what the engine once passed) sample what
    contiguous ones do: the kernels must not read them as dense vectors of the parent's memory."""
    generator = torch.Generator().manual_seed(2)
    vocab, num_rows = 700, 6
    logits = torch.randn(num_rows, vocab, generator=generator) * 3
    temperature, top_k, top_p, min_p, truncated = _params(num_rows, vocab, generator)
    packed = torch.stack([temperature, top_k.float(), top_p, min_p], dim=1)  # (R, 4): each option a column
    noise = torch.empty(num_rows, vocab).exponential_(generator=generator)
    got = nucleus.sample(logits.clone(), list(range(num_rows)), packed[:, 0], packed[:, 1].long(), packed[:, 2],
                         packed[:, 3], truncated, noise=noise)
    assert got.tolist() == reference.sample_sorted(logits, temperature, top_k, top_p, min_p, noise).tolist()


def test_sampler_rows_and_streams_on_the_reference_path():
    generator = torch.Generator().manual_seed(1)
    vocab = 300
    logits = torch.randn(6, vocab, generator=generator) * 3
    temperature, top_k, top_p, min_p, truncated = _params(4, vocab, generator)
    rows = [5, 0, 2, 3]
    streams = _streams(4, vocab)
    columns = torch.arange(vocab).expand(4, -1)
    noise = reference.exponential_at(streams, columns)
    got = nucleus.sample(logits, rows, temperature, top_k, top_p, min_p, truncated, streams=streams)
    want = reference.sample_sorted(logits[rows], temperature, top_k, top_p, min_p, noise)
    assert got.tolist() == want.tolist()
    with pytest.raises(ValueError, match="exactly one"):
        nucleus.sample(logits, rows, temperature, top_k, top_p, min_p, truncated)


def test_sampler_with_streams_in_the_interpreter(interpret):
    generator = torch.Generator().manual_seed(4)
    vocab = 2100
    for scale in (1.0, 6.0):
        logits = torch.randn(6, vocab, generator=generator) * scale
        temperature, top_k, top_p, min_p, truncated = _params(6, vocab, generator)
        streams = _streams(6, vocab)
        noise = reference.exponential_at(streams, torch.arange(vocab).expand(6, -1))
        got = nucleus.sample(logits, list(range(6)), temperature, top_k, top_p, min_p, truncated, streams=streams,
                             capacity=64)
        assert got.tolist() == reference.sample_sorted(logits, temperature, top_k, top_p, min_p, noise).tolist()


def _check_sub_block_gathering(logits, rows, temperature, sub_block_max):
    """gather_candidates against the reference at cutoffs that leave a few sub-blocks to read, many (the last row
    overflows its slots), every one (-inf: tokens past the vocabulary never qualify), none (+inf), and exactly a
    sub-block's maximum (the token is in)."""
    scaled = logits[rows].float() / temperature.unsqueeze(1)
    row_max = scaled.amax(dim=1)
    median_sub_max = sub_block_max.median(dim=1).values
    for cutoff in (row_max - torch.tensor([2.0, 1.0, 30.0]), torch.full((3,), float("-inf")),
                   torch.full((3,), float("inf")), median_sub_max):
        values, indices, count = sampling.gather_candidates(logits, rows, temperature, cutoff, sub_block_max, 64)
        _, _, ref_count = reference.gather_candidates(logits[rows], temperature, cutoff, 64)
        assert count.tolist() == ref_count.tolist()
        for r in range(3):
            n = int(count[r])
            if n > 64:
                continue
            got = sorted(zip(indices[r, :n].tolist(), values[r, :n].tolist()))
            qualifying = (scaled[r] >= cutoff[r]).nonzero().squeeze(1).tolist()
            assert [i for i, _ in got] == qualifying
            assert [v for _, v in got] == scaled[r, qualifying].tolist()


def test_gathering_takes_every_token_tied_at_a_sub_block_maximum(interpret, monkeypatch):
    """Two equal top tokens in one sub-block and a cutoff at their value: both are gathered, also when each of a
    row's programs takes several chunks of its listed sub-blocks."""
    monkeypatch.setattr(sampling, "CANDIDATE_CHUNK", 2)
    monkeypatch.setattr(sampling, "CANDIDATE_PROGRAMS", 2)
    logits = torch.randn(1, 3000)
    logits[0, 1030] = logits[0, 1031] = 9.0
    planted = [5, 200, 700, 1030, 1031, 2100, 2999]
    logits[0, [5, 200, 700, 2100, 2999]] = 9.5
    rows, temperature = torch.tensor([0]), torch.tensor([1.0])
    _, _, sub_block_max = sampling.block_stats(logits, rows, temperature)
    values, indices, count = sampling.gather_candidates(logits, rows, temperature, torch.tensor([9.0]),
                                                        sub_block_max, 16)
    assert int(count[0]) == 7 and sorted(indices[0, :7].tolist()) == planted


_RACE_ROWS = torch.tensor([4, 0, 2, 1])
_RACE_TEMPERATURE = torch.tensor([1.0, 0.7, 1.3, 1.0])
_RACE_MIN_P = torch.tensor([0.0, 0.0, 0.1, 0.0])


def _race_rest_and_expected(logits, streams, **kwargs):
    """``race.race_rest`` after the candidates' race for the rows of ``_RACE_ROWS`` without top-k / top-p, and
    the sort-based sampler's tokens with the same draws."""
    rows, temperature, min_p = _RACE_ROWS, _RACE_TEMPERATURE, _RACE_MIN_P
    num_rows, vocab = rows.shape[0], logits.shape[1]
    no_k, no_p = torch.zeros(num_rows, dtype=torch.int64), torch.ones(num_rows)
    block_max, block_sum, sub_block_max = sampling.block_stats(logits, rows, temperature)
    row_max, mass, cutoff = selection.row_cutoffs(block_max, block_sum, no_k, vocab, 64)
    values, indices, count = sampling.gather_candidates(logits, rows, temperature, cutoff, sub_block_max, 64)
    token, best, floor, bound, _ = selection.select_candidates(values, indices, count, row_max, mass, no_k, no_p,
                                                               min_p, vocab, streams)
    noise = reference.exponential_at(streams, torch.arange(vocab).expand(num_rows, -1))
    want = reference.sample_sorted(logits[rows], temperature, no_k, no_p, min_p, noise)
    got = race.race_rest(logits, rows, temperature, row_max, floor, bound, streams, block_max, token, best,
                         sub_block_max, **kwargs)
    return got.tolist(), want.tolist()


def test_race_rest_in_the_interpreter_listed_and_dense(interpret, monkeypatch):
    """The rest of the race (rows without top-k / top-p) gives the dense race's tokens, whether the tokens that may
    win fit the slots (several chunks of the finishing loop) or overflow them (the dense blocks)."""
    monkeypatch.setattr(race, "CHUNK", 64)
    generator = torch.Generator().manual_seed(5)
    for scale in (0.5, 3.0):
        logits = torch.randn(5, 2100, generator=generator) * scale
        for capacity in (8192, 16):
            got, want = _race_rest_and_expected(logits, _streams(4, 2100), capacity=capacity)
            assert got == want, (scale, capacity)


def _shared_stream_rows(seed: int):
    """Logits (5, 2100), the streams of 4 rows (3 of one shared call, bases position * vocab, a stride that is no
    multiple of the block; a seeded row among them) and their ``race.SharedStream``."""
    generator = torch.Generator().manual_seed(seed)
    vocab, stride = 2100, 1280
    logits = torch.randn(5, vocab, generator=generator) * 0.5
    stream_rows = [[77, 8, position * vocab, stride] for position in range(3)]
    stream_rows.insert(1, [5, 0, 0, 2304])
    return logits, stream_rows, race.shared_stream(stream_rows, [True, False, True, True], torch.device("cpu"))


def test_shared_stream_dense_race_in_the_interpreter(interpret):
    """Rows drawing from one shared call race densely through the shared kernel to the tokens of the per-row
    dense race; a seeded row beside them."""
    logits, stream_rows, shared = _shared_stream_rows(6)
    assert shared.index.tolist() == [0, 2, 3] and shared.min_stride == 1280
    got, want = _race_rest_and_expected(logits, torch.tensor(stream_rows), shared=shared, capacity=16)
    assert got == want


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows, vocab", [(1, 151936), (3, 151936), (256, 151936), (2, 1000), (600, 32000)])
def test_exponential_stream_equals_torch_on_cuda(rows, vocab):
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(1234)
    torch.empty(5, 7, device=device).exponential_(generator=generator)  # a non-zero offset
    offset = generator.get_offset()
    stride, increment = philox.torch_stream_layout(rows * vocab, device)
    expected = torch.empty(rows, vocab, device=device).exponential_(generator=generator)
    assert generator.get_offset() == offset + increment
    streams = torch.tensor([[1234, offset // 4, r * vocab, stride] for r in range(rows)], device=device)
    columns = torch.arange(vocab, device=device).expand(rows, -1).contiguous()
    got = philox.exponential_at(streams, columns)
    assert torch.equal(got, expected), f"{(got != expected).sum().item()} of {got.numel()} draws differ"
    # the reference takes the precise log (CUDA's fast __logf, which torch's kernel calls, differs in the last bits)
    torch.testing.assert_close(reference.exponential_at(streams[:1], columns[:1, :4096]), expected[:1, :4096],
                               rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_scaled_logits_on_cuda_are_torchs_division_bit_for_bit():
    """The kernels divide by the temperature as a product by its reciprocal corrected by fused multiply-adds:
    every gathered value (a cutoff of -inf gathers the whole row) and every sub-block maximum equals torch's
    ``logits / temperature``, over logits of many magnitudes (and +-inf) and awkward temperatures."""
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(9)
    vocab = 151936
    temperature = torch.tensor([0.05, 0.3, 0.7, 1.0, 1.3, 2.7, 7.0, 0.9999, 1 / 3, 1e-3], device=device)
    scales = torch.tensor([1.0, 30.0, 1e-30, 1e30, 3.0, 1e4, 0.5, 1e-3, 100.0, 1e-20], device=device)
    logits = torch.randn(temperature.shape[0], vocab, device=device, generator=generator) * scales.unsqueeze(1)
    logits[0, :3] = torch.tensor([float("inf"), float("-inf"), 0.0])
    rows = torch.arange(temperature.shape[0], device=device)
    expected = logits / temperature.unsqueeze(1)
    _, _, sub_block_max = sampling.block_stats(logits, rows, temperature)
    _, _, want_sub_max = reference.block_stats(logits, temperature, sampling.BLOCK,
                                               sampling.BLOCK // sampling.SUB_BLOCKS)
    assert torch.equal(sub_block_max, want_sub_max)
    values, indices, count = sampling.gather_candidates(logits, rows, temperature,
                                                        torch.full_like(temperature, float("-inf")),
                                                        sub_block_max, vocab)
    assert (count == vocab).all()
    got = torch.empty_like(expected).scatter_(1, indices, values)
    assert torch.equal(got, expected), f"{(got != expected).sum().item()} values differ"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", ["flat", "peaked"])
def test_sampler_on_cuda_equals_the_sort_based_one(shape):
    """Flat logits: untruncated rows race densely (their tokens that may win overflow the slots); peaked ones (a
    head of 64 tokens 12 above the bulk, as an LM's): they race the compacted tokens."""
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(3)
    vocab, num_rows = 151936, 64
    logits = torch.randn(num_rows, vocab, device=device, generator=generator) * (4 if shape == "flat" else 2)
    if shape == "peaked":
        head = torch.randint(0, vocab, (num_rows, 64), device=device, generator=generator)
        logits.scatter_(1, head, logits.gather(1, head) + 12.0)
    temperature, top_k, top_p, min_p, truncated = (t.to(device) if isinstance(t, torch.Tensor) else t
                                                   for t in _params(num_rows, vocab, torch.Generator()))
    offset = generator.get_offset()
    stride, _ = philox.torch_stream_layout(num_rows * vocab, device)
    noise = torch.empty(num_rows, vocab, device=device).exponential_(generator=generator)
    streams = torch.tensor([[3, offset // 4, r * vocab, stride] for r in range(num_rows)], device=device)
    got = nucleus.sample(logits, list(range(num_rows)), temperature, top_k, top_p, min_p, truncated,
                         streams=streams)
    want = reference.sample_sorted(logits, temperature, top_k, top_p, min_p, noise)
    assert got.tolist() == want.tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_sampler_on_cuda_gives_the_tokens_of_drawn_noise():
    """The engine's Sampler computing torch's draws in its kernels samples what it samples when it draws them
    (as flashserve did before), step after step, seeded and shared rows, every option."""
    from flashserve import SamplingParams
    from flashserve.engine.request import Request
    from flashserve.engine.sampler import Sampler

    device = torch.device("cuda")
    computing, drawing = Sampler(device, seed=11), Sampler(device, seed=11)
    assert computing.computes_noise, "exponential_at does not reproduce torch's exponential_ on this GPU"
    drawing.computes_noise = False
    options = [dict(temperature=1.0, top_p=0.9), dict(temperature=0.7, top_k=20, top_p=0.8), dict(temperature=0.8),
               dict(temperature=1.0, min_p=0.05), dict(temperature=0), dict(temperature=1.2, top_k=50)]

    def requests(tag):
        result = []
        for i in range(48):
            params = SamplingParams(seed=i if i % 3 == 0 else None, **options[i % len(options)])
            request = Request(f"{tag}{i}", None, [1, 2, 3], params, max_model_len=1000)
            if params.seed is not None:
                request.generator = torch.Generator(device=device).manual_seed(params.seed)
            result.append(request)
        return result

    batch_a, batch_b = requests("a"), requests("b")
    generator = torch.Generator(device=device).manual_seed(5)
    for step in range(4):
        logits = torch.randn(48, 151936, device=device, generator=generator) * (2 + 3 * step)
        tokens_a, _ = computing(logits.clone(), batch_a, eos_token_ids=[0])
        tokens_b, _ = drawing(logits.clone(), batch_b, eos_token_ids=[0])
        assert tokens_a == tokens_b, f"step {step}"
        for a, b, token in zip(batch_a, batch_b, tokens_a):
            a.token_ids.append(token)
            b.token_ids.append(token)


def test_race_rest_straight_to_the_dense_race_in_the_interpreter(interpret, monkeypatch):
    """Rows whose blocks mostly reach the threshold skip the compaction: the same tokens, seeded and shared
    streams alike."""
    monkeypatch.setattr(race, "DENSE_BLOCK_FRACTION", 0.0)
    logits, stream_rows, shared = _shared_stream_rows(8)
    for kwargs in (dict(), dict(shared=shared)):
        got, want = _race_rest_and_expected(logits, torch.tensor(stream_rows), capacity=16, **kwargs)
        assert got == want, kwargs
