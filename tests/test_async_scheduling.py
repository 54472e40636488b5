"""Async scheduling (``flashserve.engine.inflight``) gives the outputs of the synchronous engine.

Every test runs the same requests with ``async_scheduling`` on and off and compares everything a RequestOutput
holds: token ids, text, finish and stop reasons, logprobs and prompt logprobs. The requests mix greedy and seeded
sampling, stop tokens and strings found in a first synchronous run (so that requests end mid-batch, one step late
under async scheduling), an EOS made likely by a logit bias, min_tokens, max_tokens (0 included), penalties,
logprobs and prompt logprobs, over prefix caching, chunked prefill and a pool small enough to preempt. Streaming through
``engine.step`` must deliver every token and character once; abort and tensor-parallel followers are covered too.

Runs on the PyTorch reference attention (the engine logic does not depend on the backend).
"""
import random

import pytest

from flashserve import LLM, SamplingParams
from flashserve.engine.block_manager import BlockManager
from flashserve.engine.request import PENDING_TOKEN, Request
from flashserve.engine.scheduler import Scheduler
from flashserve.models.checkpoint import write_random_checkpoint

MAX_TOKENS = 10


@pytest.fixture(autouse=True)
def reference_attention(request, monkeypatch):
    """CPU tests run the PyTorch reference kernels (fast); GPU tests the Triton ones (graphs need them)."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv("FLASHSERVE_ATTENTION_BACKEND", "torch")


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    return write_random_checkpoint(str(tmp_path_factory.mktemp("async")), "LlamaForCausalLM", seed=3)


def _prompts() -> list[list[int]]:
    """Ten prompts of 3 to 30 tokens; several share their first 12 tokens (prefix-cache hits)."""
    rng = random.Random(1)
    shared = [rng.randrange(10, 390) for _ in range(12)]
    prompts = [shared + [rng.randrange(10, 390) for _ in range(rng.randint(1, 18))] for _ in range(5)]
    return prompts + [[rng.randrange(10, 390) for _ in range(rng.randint(3, 20))] for _ in range(5)]


def _llm(directory: str, async_scheduling: bool, **options) -> LLM:
    options = dict(dtype="float32", device="cpu", block_size=4, num_kv_blocks=128) | options
    return LLM(directory, async_scheduling=async_scheduling, **options)


def _feature_params(directory: str, prompts: list[list[int]]) -> list[SamplingParams]:
    """One SamplingParams per prompt, whose stop tokens and strings come from a synchronous greedy run (so that
    they end requests in the middle of the run)."""
    llm = _llm(directory, False)
    base = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
                        use_tqdm=False)
    tokens = [output.outputs[0].token_ids for output in base]
    texts = [output.outputs[0].text for output in base]
    eos = llm.engine.eos_token_ids[0]
    return [
        SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=[tokens[0][3]]),
        SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop=[texts[1][len(texts[1]) // 2:][:3]],
                       include_stop_str_in_output=True),
        SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=11, max_tokens=MAX_TOKENS, logprobs=3),
        SamplingParams(temperature=0, max_tokens=MAX_TOKENS, min_tokens=4, stop_token_ids=tokens[3][1:5],
                       logprobs=2),
        SamplingParams(temperature=0.8, seed=5, max_tokens=MAX_TOKENS, repetition_penalty=1.3,
                       presence_penalty=0.5, frequency_penalty=0.3, prompt_logprobs=2),
        SamplingParams(temperature=1.0, seed=9, max_tokens=MAX_TOKENS, logit_bias={eos: 8.0}),
        SamplingParams(temperature=0, max_tokens=0, prompt_logprobs=1),
        SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, prompt_logprobs=1),
        SamplingParams(temperature=0.7, min_p=0.05, seed=3, max_tokens=MAX_TOKENS,
                       stop=[texts[8][len(texts[8]) // 2:][:2]]),
        SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logit_bias={tokens[9][0]: -50.0}),
    ]


def _logprob_rows(rows) -> list | None:
    if rows is None:
        return None
    return [None if row is None else {t: (lp.logprob, lp.rank) for t, lp in row.items()} for row in rows]


def _summary(outputs) -> list[tuple]:
    """What the two modes must agree on, per request."""
    result = []
    for output in outputs:
        completion = output.outputs[0]
        result.append((completion.token_ids, completion.text, completion.finish_reason, completion.stop_reason,
                       _logprob_rows(completion.logprobs), _logprob_rows(output.prompt_logprobs)))
    return result


def _assert_same(ours: list[tuple], theirs: list[tuple]) -> None:
    """Equal summaries; logprobs within 1e-4 (a batch that differs by a request that ended one step late changes
    the float rounding of the others' rows)."""
    assert len(ours) == len(theirs)
    for one, other in zip(ours, theirs):
        assert one[:4] == other[:4]
        for rows, other_rows in zip(one[4:], other[4:]):
            assert (rows is None) == (other_rows is None)
            for row, other_row in zip(rows or [], other_rows or []):
                assert (row is None) == (other_row is None)
                if row is not None:
                    assert row.keys() == other_row.keys()
                    assert all(row[t][1] == other_row[t][1] and abs(row[t][0] - other_row[t][0]) < 1e-4
                               for t in row)
            assert len(rows or []) == len(other_rows or [])


def _assert_idle(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished() and not engine.requests
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.fixture(scope="module")
def cases(directory):
    prompts = _prompts()
    with pytest.MonkeyPatch.context() as patch:  # module fixtures run before the autouse one
        patch.setenv("FLASHSERVE_ATTENTION_BACKEND", "torch")
        return prompts, _feature_params(directory, prompts)


@pytest.mark.parametrize("options", [
    dict(),
    dict(max_num_batched_tokens=16),
    dict(num_kv_blocks=24, max_num_batched_tokens=24),
    dict(block_size=1, num_kv_blocks=400, enable_prefix_caching=False),
], ids=["prefix-caching", "chunked-prefill", "preemption", "no-prefix-caching"])
def test_outputs_equal_synchronous(directory, cases, options):
    prompts, params = cases
    results, preemptions = {}, {}
    for mode in (False, True):
        llm = _llm(directory, mode, **options)
        results[mode] = _summary(llm.generate(prompts, params, use_tqdm=False))
        if not options:
            results[mode] += _summary(llm.generate(prompts, params, use_tqdm=False))  # a rerun hits the cache
        preemptions[mode] = llm.engine.scheduler.num_preemptions
        _assert_idle(llm)
    _assert_same(results[True], results[False])
    reasons = {summary[2] for summary in results[False]}
    assert reasons == {"stop", "length"}
    if "num_kv_blocks" in options and options["num_kv_blocks"] < 100:
        assert preemptions[True] > 0 and preemptions[False] > 0


def test_streaming_delivers_every_token_once(directory, cases):
    prompts, params = cases
    expected = _summary(_llm(directory, False).generate(prompts, params, use_tqdm=False))
    engine = _llm(directory, True, max_num_batched_tokens=16).engine
    for i, (prompt, sampling) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), prompt, sampling)
    tokens, texts, finished = {}, {}, []
    while engine.has_unfinished():
        for output in engine.step():
            assert output.request_id not in finished
            tokens.setdefault(output.request_id, []).extend(output.outputs[0].token_ids)
            texts[output.request_id] = texts.get(output.request_id, "") + output.outputs[0].text
            if output.finished:
                finished.append(output.request_id)
    assert sorted(finished, key=int) == [str(i) for i in range(len(prompts))]
    assert [tokens[str(i)] for i in range(len(prompts))] == [summary[0] for summary in expected]
    assert [texts[str(i)] for i in range(len(prompts))] == [summary[1] for summary in expected]


def test_abort_while_a_step_is_in_flight(directory, cases):
    prompts, _ = cases
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = {}
    for mode in (False, True):
        llm = _llm(directory, mode)
        engine = llm.engine
        for i, prompt in enumerate(prompts[:4]):
            engine.add_request(str(i), prompt, params)
        tokens = {}
        for step in range(30):
            if step == 4:
                engine.abort_request(["1", "2"])
            for output in engine.step():
                tokens.setdefault(output.request_id, []).extend(output.outputs[0].token_ids)
            if not engine.has_unfinished():
                break
        _assert_idle(llm)
        outputs[mode] = (tokens["0"], tokens["3"])
        engine.add_request("x", prompts[5], params)
        engine.step()
        engine.abort_request("x")  # the last in-flight step holds only aborted requests
        _assert_idle(llm)
    assert outputs[True] == outputs[False]
    assert len(outputs[True][0]) == MAX_TOKENS


def test_a_pending_token_is_not_registered_in_the_prefix_cache():
    manager = BlockManager(num_blocks=8, block_size=4)
    request = Request("r", None, [5, 6, 7], SamplingParams(), max_model_len=64)
    assert manager.allocate_slots(request, 3)
    request.num_computed_tokens = 3
    request.token_ids.append(PENDING_TOKEN)  # the block's last token is sampled, not yet read
    assert manager.allocate_slots(request, 1)
    assert request.num_cached_blocks == 0 and not manager.cached
    request.token_ids[-1] = 8
    request.num_computed_tokens = 4
    request.token_ids.append(PENDING_TOKEN)
    assert manager.allocate_slots(request, 1)
    assert request.num_cached_blocks == 1
    assert manager.blocks[request.block_ids[0]].token_ids == (5, 6, 7, 8)


def test_a_request_preempted_before_its_token_is_read_can_finish():
    manager = BlockManager(num_blocks=8, block_size=4)
    scheduler = Scheduler(manager, max_num_seqs=4, max_num_batched_tokens=64)
    request = Request("r", None, [5, 6, 7], SamplingParams(), max_model_len=64)
    scheduler.add(request)  # waiting, as after a preemption
    scheduler.finish(request, "stop")
    assert request.is_finished and not scheduler.has_unfinished()


def test_tensor_parallel_followers(directory, cases):
    prompts, params = cases
    results = {}
    for mode in (False, True):
        llm = _llm(directory, mode, tensor_parallel_size=2, max_num_batched_tokens=16)
        try:
            results[mode] = _summary(llm.generate(prompts[:6], params[:6], use_tqdm=False))
        finally:
            llm.close()
    _assert_same(results[True], results[False])


@pytest.mark.gpu
def test_outputs_equal_synchronous_on_gpu_with_graphs(directory, cases):
    """On CUDA (graphs, pinned copies, the token readback's events): the same outputs with async scheduling on
    and off."""
    prompts, params = cases
    results = {}
    for mode in (False, True):
        llm = _llm(directory, mode, device="cuda", block_size=16, num_kv_blocks=256, max_num_batched_tokens=64)
        results[mode] = _summary(llm.generate(prompts, params, use_tqdm=False))
        results[mode] += _summary(llm.generate(prompts * 4, params * 4, use_tqdm=False))
        _assert_idle(llm)
    _assert_same(results[True], results[False])
