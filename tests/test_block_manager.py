"""Block manager: allocation, chained hashing with verification, reference counts, LRU/tail-first eviction."""
from flashserve.engine.block_manager import BlockManager
from flashserve.engine.request import Request
from flashserve.sampling_params import SamplingParams


def _request(token_ids, request_id="r", max_tokens=4):
    return Request(request_id, None, token_ids, SamplingParams(max_tokens=max_tokens), max_model_len=1024)


def _admit(manager: BlockManager, request: Request) -> int:
    """Admit a request the way the scheduler does; returns its prefix-cache hit in tokens."""
    hits, num_hit = manager.get_computed_blocks(request)
    if not manager.allocate_slots(request, request.num_tokens - num_hit, hits):
        raise RuntimeError("allocation failed")
    manager.record_prefix_hits(request.num_tokens, num_hit)
    request.num_computed_tokens = request.num_tokens
    return num_hit


def test_allocation_counts_blocks_and_free_returns_them():
    manager = BlockManager(num_blocks=8, block_size=4)
    request = _request(list(range(10)))
    assert _admit(manager, request) == 0
    assert len(request.block_ids) == 3 and manager.num_free_blocks == 5
    request.token_ids.append(99)  # a decode: token 10 fits in the third block
    assert manager.allocate_slots(request, 1) and len(request.block_ids) == 3
    request.num_computed_tokens += 1
    request.token_ids.append(100)  # token 11 still fits; token 12 needs a fourth block
    assert manager.allocate_slots(request, 1)
    request.num_computed_tokens += 1
    request.token_ids.append(101)
    assert manager.allocate_slots(request, 1) and len(request.block_ids) == 4
    manager.free(request)
    assert manager.num_free_blocks == 8 and request.block_ids == []


def test_failed_allocation_changes_nothing():
    manager = BlockManager(num_blocks=2, block_size=4)
    request = _request(list(range(12)))
    hits, _ = manager.get_computed_blocks(request)
    assert not manager.allocate_slots(request, 12, hits)
    assert manager.num_free_blocks == 2 and request.block_ids == []


def test_shared_prefix_hits_full_blocks_and_counts_references():
    manager = BlockManager(num_blocks=16, block_size=4)
    first = _request(list(range(10)), "a")
    _admit(manager, first)
    second = _request(list(range(8)) + [50, 51, 52], "b")
    assert _admit(manager, second) == 8  # two full blocks shared, the partial third block is not cached
    assert second.block_ids[:2] == first.block_ids[:2]
    assert [manager.blocks[b].ref_count for b in first.block_ids] == [2, 2, 1]
    assert manager.num_queried_tokens == 21 and manager.num_hit_tokens == 8
    manager.free(first)
    assert manager.blocks[second.block_ids[0]].ref_count == 1
    manager.free(second)
    assert manager.num_free_blocks == 16


def test_hash_is_chained_through_the_parent_block():
    manager = BlockManager(num_blocks=16, block_size=4)
    _admit(manager, _request([1, 2, 3, 4, 5, 6, 7, 8, 9], "a"))
    # Same second block, different first block: the second block must not hit.
    other = _request([0, 2, 3, 4, 5, 6, 7, 8, 9], "b")
    assert manager.get_computed_blocks(other) == ([], 0)


def test_fully_cached_prompt_recomputes_its_last_token():
    manager = BlockManager(num_blocks=16, block_size=4)
    _admit(manager, _request(list(range(8)), "a"))
    again = _request(list(range(8)), "b")
    hits, num_hit = manager.get_computed_blocks(again)
    assert num_hit == 4 and len(hits) == 1


def test_hit_is_verified_against_stored_tokens():
    manager = BlockManager(num_blocks=16, block_size=4)
    first = _request(list(range(9)), "a")
    _admit(manager, first)
    # Simulate a hash collision: the cached block's stored tokens no longer match the key.
    manager.blocks[first.block_ids[0]].token_ids = (7, 7, 7, 7)
    assert manager.get_computed_blocks(_request(list(range(9)), "b")) == ([], 0)


def test_eviction_is_lru_and_tail_first():
    manager = BlockManager(num_blocks=4, block_size=2)
    request = _request([1, 2, 3, 4, 5, 6, 7], "a")  # blocks: [1,2] [3,4] [5,6] full, [7] partial
    _admit(manager, request)
    full = request.block_ids[:3]
    partial = request.block_ids[3]
    manager.free(request)
    # The uncached partial block is reused first, then the tail of the finished request.
    assert list(manager.free_queue) == [partial, full[2], full[1], full[0]]
    newcomer = _request([9, 9, 9], "b")
    _admit(manager, newcomer)  # needs two blocks: the partial one, then the tail block [5, 6]
    assert newcomer.block_ids == [partial, full[2]]
    assert manager.blocks[full[2]].block_hash is None
    # The first two blocks of the prompt are still cached.
    assert manager.get_computed_blocks(_request([1, 2, 3, 4, 5], "c"))[1] == 4


def test_reusing_a_free_cached_block_takes_it_out_of_the_free_queue():
    manager = BlockManager(num_blocks=4, block_size=2)
    request = _request([1, 2, 3, 4, 5], "a")
    _admit(manager, request)
    manager.free(request)
    again = _request([1, 2, 3, 4, 5], "b")
    assert _admit(manager, again) == 4
    assert manager.num_free_blocks == 1
    manager.free(again)
    assert manager.num_free_blocks == 4


def test_reset_prefix_cache_and_disabled_caching():
    manager = BlockManager(num_blocks=8, block_size=2)
    request = _request([1, 2, 3, 4, 5], "a")
    _admit(manager, request)
    manager.free(request)
    manager.reset_prefix_cache()
    assert manager.get_computed_blocks(_request([1, 2, 3, 4, 5], "b")) == ([], 0)
    assert manager.hit_rate == 0.0
    disabled = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    request = _request([1, 2, 3, 4, 5], "c")
    _admit(disabled, request)
    assert not disabled.cached
    disabled.free(request)
    assert disabled.get_computed_blocks(_request([1, 2, 3, 4, 5], "d")) == ([], 0)
