"""InputBuffers packs a mixed batch (decode, prompt chunk, cached-prefix prompt) exactly, step after step."""
import random

import torch

from flashserve.engine.input_buffers import InputBuffers
from flashserve.engine.request import Request
from flashserve.engine.scheduler import ScheduledBatch
from flashserve.sampling_params import SamplingParams


def _request(token_ids, num_computed, block_ids):
    request = Request("r", None, token_ids, SamplingParams(), max_model_len=64)
    request.num_computed_tokens = num_computed
    request.block_ids = list(block_ids)
    return request


def _batch(entries):
    batch = ScheduledBatch()
    for request, num_new in entries:
        batch.add(request, num_new)
    return batch


def test_prepare_packs_tokens_slots_and_block_table():
    buffers = InputBuffers(max_num_tokens=16, max_num_seqs=4, max_blocks_per_seq=8, block_size=4,
                           device=torch.device("cpu"))
    decode = _request(list(range(100, 106)), 5, [7, 2])
    chunk = _request(list(range(200, 210)), 0, [3, 5])
    cached = _request(list(range(300, 306)), 4, [9, 1])
    inputs = buffers.prepare(_batch([(decode, 1), (chunk, 6), (cached, 2)]))
    context = inputs.context
    assert inputs.input_ids.tolist() == [105, 200, 201, 202, 203, 204, 205, 304, 305]
    assert inputs.positions.tolist() == [5, 0, 1, 2, 3, 4, 5, 4, 5]
    assert context.slot_mapping.tolist() == [2 * 4 + 1, 12, 13, 14, 15, 20, 21, 4, 5]
    assert context.cu_seqlens_q.tolist() == [0, 1, 7, 9]
    assert context.seqused_k.tolist() == [6, 6, 6]
    assert context.block_table.shape == (3, 8)
    assert context.block_table[:, :2].tolist() == [[7, 2], [3, 5], [9, 1]]
    assert inputs.logits_indices.tolist() == [0, 8]
    assert (context.max_seqlen_q, context.max_seqlen_k, context.is_decode) == (6, 6, False)
    decode.token_ids.append(106)
    decode.num_computed_tokens = 6
    inputs = buffers.prepare(_batch([(decode, 1)]))
    assert inputs.input_ids.tolist() == [106] and inputs.positions.tolist() == [6]
    assert inputs.context.slot_mapping.tolist() == [2 * 4 + 2] and inputs.context.is_decode
    assert inputs.logits_indices.tolist() == [0] and inputs.context.block_table.shape == (1, 8)


def test_block_table_rows_follow_joins_leaves_growth_and_new_block_lists():
    """Rows persist per request: requests join, leave, come back, gain blocks or get a new block list (freed and
    reallocated); every step's block table holds each scheduled request's blocks in its row's first columns."""
    rng = random.Random(0)
    buffers = InputBuffers(max_num_tokens=64, max_num_seqs=6, max_blocks_per_seq=16, block_size=4,
                           device=torch.device("cpu"))
    requests = [_request(list(range(8)), 7, rng.sample(range(100), 2)) for _ in range(8)]
    for _ in range(60):
        scheduled = rng.sample(requests, rng.randint(1, 6))
        for request in scheduled:
            if rng.random() < 0.2:
                request.block_ids = rng.sample(range(100), rng.randint(1, 12))  # freed, then allocated anew
            elif rng.random() < 0.3 and len(request.block_ids) < 16:
                request.block_ids.append(rng.randrange(100))
            request.num_computed_tokens = 4 * len(request.block_ids) - 1
            request.token_ids[:] = list(range(4 * len(request.block_ids)))
        table = buffers.prepare(_batch([(request, 1) for request in scheduled])).context.block_table
        for row, request in zip(table.tolist(), scheduled):
            assert row[:len(request.block_ids)] == request.block_ids


def test_block_table_rows_of_a_repeated_batch_extend_only_the_allocated_requests():
    """The scheduler's batch of the same requests, in order, lists in ``allocated`` only those that gained blocks
    (or a new block list): their rows are extended in place, the others keep theirs."""
    rng = random.Random(1)
    buffers = InputBuffers(max_num_tokens=64, max_num_seqs=6, max_blocks_per_seq=16, block_size=4,
                           device=torch.device("cpu"))
    requests = [_request(list(range(8)), 7, rng.sample(range(100), 2)) for _ in range(5)]
    for step in range(40):
        batch = _batch([(request, 1) for request in requests])
        if step:
            batch.allocated = []
            for index, request in enumerate(requests):
                if rng.random() < 0.1:
                    request.block_ids = rng.sample(range(100), rng.randint(1, 12))
                elif rng.random() < 0.3 and len(request.block_ids) < 16:
                    request.block_ids.append(rng.randrange(100))
                else:
                    continue
                batch.allocated.append(index)
        table = buffers.prepare(batch).context.block_table
        for row, request in zip(table.tolist(), requests):
            assert row[:len(request.block_ids)] == request.block_ids
