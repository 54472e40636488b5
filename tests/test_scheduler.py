"""Scheduler with a fake token stream: token budget, chunked prefill, prefix hits, preemption, abort, no leaks."""
import random

from flashserve.engine.block_manager import BlockManager
from flashserve.engine.request import Request, RequestStatus
from flashserve.engine.scheduler import Scheduler
from flashserve.sampling_params import SamplingParams


def _make(num_blocks=64, block_size=4, max_num_seqs=8, budget=64, caching=True):
    manager = BlockManager(num_blocks, block_size, caching)
    return Scheduler(manager, max_num_seqs, budget), manager


def _request(request_id, prompt, max_tokens=3):
    return Request(request_id, None, prompt, SamplingParams(max_tokens=max_tokens), max_model_len=10_000)


def _step(scheduler: Scheduler):
    """One step with a fake model: every sampling request gets token 7; finished at max_tokens."""
    batch = scheduler.schedule()
    scheduler.advance(batch)
    for request, samples in zip(batch.requests, batch.samples):
        if samples:
            request.token_ids.append(7)
            if request.num_tokens >= request.max_total_tokens:
                scheduler.finish(request, "length")
    return batch


def _run(scheduler: Scheduler, max_steps=1000):
    steps = []
    while scheduler.has_unfinished():
        steps.append(_step(scheduler))
        if len(steps) > max_steps:
            raise RuntimeError("the scheduler did not finish")
    return steps


def test_chunked_prefill_then_decode():
    scheduler, manager = _make(budget=4)
    request = _request("a", list(range(10)), max_tokens=2)
    scheduler.add(request)
    steps = _run(scheduler)
    assert [b.num_new_tokens for b in steps] == [[4], [4], [2], [1]]
    assert [b.samples for b in steps] == [[False], [False], [True], [True]]
    assert request.output_token_ids == [7, 7] and request.finish_reason == "length"
    assert manager.num_free_blocks == manager.num_blocks


def test_running_requests_are_served_before_waiting_ones():
    scheduler, _ = _make(budget=6)
    first = _request("a", list(range(5)), max_tokens=4)
    scheduler.add(first)
    _step(scheduler)
    second = _request("b", list(range(100, 120)), max_tokens=1)
    scheduler.add(second)
    batch = _step(scheduler)
    assert batch.requests == [first, second] and batch.num_new_tokens == [1, 5]


def test_max_num_seqs_limits_running_requests():
    scheduler, manager = _make(max_num_seqs=2)
    requests = [_request(str(i), [i] * 3) for i in range(5)]
    for request in requests:
        scheduler.add(request)
    batch = _step(scheduler)
    assert len(batch) == 2 and len(scheduler.running) == 2
    _run(scheduler)
    assert all(r.is_finished for r in requests) and manager.num_free_blocks == manager.num_blocks


def test_prefix_hits_start_after_the_cached_tokens():
    scheduler, _ = _make(block_size=4)
    scheduler.add(_request("a", list(range(12)), max_tokens=1))
    _run(scheduler)
    second = _request("b", list(range(8)) + [40, 41], max_tokens=1)
    scheduler.add(second)
    batch = _step(scheduler)
    assert batch.num_new_tokens == [2]


def test_preemption_frees_the_newest_request_and_recomputes_it():
    scheduler, manager = _make(num_blocks=6, block_size=4, budget=64)
    old = _request("old", list(range(7)), max_tokens=9)   # grows to 15 tokens: 4 blocks
    new = _request("new", list(range(50, 57)), max_tokens=9)
    scheduler.add(old)
    scheduler.add(new)
    first = _step(scheduler)
    assert first.requests == [old, new]
    preempted_at = None
    for step_index in range(100):
        batch = _step(scheduler)
        if batch.preempted:
            preempted_at = step_index
            assert batch.preempted == [new] and scheduler.waiting[0] is new
            assert new.num_computed_tokens == 0 and new.block_ids == []
            assert new.status == RequestStatus.WAITING
            break
    assert preempted_at is not None
    _run(scheduler)
    assert old.output_token_ids == [7] * 9 and new.output_token_ids == [7] * 9
    assert manager.num_free_blocks == manager.num_blocks


def test_abort_frees_blocks_of_running_and_waiting_requests():
    scheduler, manager = _make(max_num_seqs=1)
    running = _request("a", list(range(9)), max_tokens=50)
    waiting = _request("b", list(range(9)), max_tokens=50)
    scheduler.add(running)
    scheduler.add(waiting)
    _step(scheduler)
    _step(scheduler)
    assert running.status == RequestStatus.RUNNING and waiting.status == RequestStatus.WAITING
    scheduler.abort(running)
    scheduler.abort(waiting)
    assert not scheduler.has_unfinished()
    assert manager.num_free_blocks == manager.num_blocks
    assert running.finish_reason == "abort"


def test_random_workload_on_a_tiny_pool_finishes_without_leaks():
    rng = random.Random(0)
    for caching in (True, False):
        scheduler, manager = _make(num_blocks=12, block_size=2, max_num_seqs=5, budget=7, caching=caching)
        requests = []
        for i in range(30):
            prompt = [rng.randrange(3) for _ in range(rng.randrange(1, 12))]
            request = _request(str(i), prompt, max_tokens=rng.randrange(1, 10))
            requests.append(request)
            scheduler.add(request)
            if i % 3 == 0:
                _step(scheduler)
        _run(scheduler)
        assert all(len(r.output_token_ids) == r.params.max_tokens for r in requests)
        assert manager.num_free_blocks == manager.num_blocks
        assert scheduler.num_preemptions > 0


def test_prefix_statistics_count_a_waiting_request_once():
    scheduler, manager = _make(num_blocks=4, block_size=4, budget=64)
    scheduler.add(_request("a", list(range(12)), max_tokens=4))
    scheduler.add(_request("b", list(range(100, 112)), max_tokens=4))
    for _ in range(3):
        _step(scheduler)  # "b" waits for blocks while "a" runs
    assert manager.num_queried_tokens == 12
    _run(scheduler)
    assert manager.num_queried_tokens == 24
