"""The paged KV cache's bookkeeping: which block holds which tokens, reference counts, and the prefix cache.

Blocks hold ``block_size`` tokens each. With prefix caching, every FULL block is registered under a chained hash of
(hash of the previous block, the block's token ids); a later request whose prompt starts with the same tokens
reuses those blocks instead of recomputing them. A hit is verified against the block's stored token ids and parent
hash, so a hash collision can never hand back the wrong KV.

Free blocks wait in an LRU queue: allocation takes the block at its front, evicting whatever prefix it cached.
A finished request releases its blocks tail first, so its last blocks (the least likely to be shared) are evicted
before its first ones; blocks that cache nothing go to the front, to be reused first.

A block whose last token is still ``PENDING_TOKEN`` (async scheduling) is registered by the request's next
allocation, once the token is known.
"""
from collections import OrderedDict
from dataclasses import dataclass

from flashserve.engine.request import PENDING_TOKEN, Request

_ROOT_HASH = 0x5EED


@dataclass(slots=True)
class Block:
    """One KV-cache block: how many requests use it and, when it caches a full block, its key."""

    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    parent_hash: int | None = None
    token_ids: tuple[int, ...] | None = None


class BlockManager:
    """Allocates KV-cache blocks to requests and maintains the prefix cache.

    Args:
        num_blocks: blocks in the pool.
        block_size: tokens per block.
        enable_prefix_caching: register full blocks and reuse them across requests.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request uses (some may still cache a prefix)."""
        return len(self.free_queue)

    @property
    def hit_rate(self) -> float:
        """Prefix-cache hits over queried prompt tokens since the last reset (0 when nothing was queried)."""
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def blocks_for_tokens(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def _hash_blocks(self, request: Request, num_full_blocks: int) -> None:
        """Extend ``request.block_hashes`` to cover its first ``num_full_blocks`` full blocks."""
        size = self.block_size
        for index in range(len(request.block_hashes), num_full_blocks):
            parent = request.block_hashes[index - 1] if index else _ROOT_HASH
            tokens = tuple(request.token_ids[index * size:(index + 1) * size])
            request.block_hashes.append(hash((parent, tokens)))

    def _lookup(self, request: Request, index: int) -> int | None:
        """The cached block holding full block ``index`` of ``request``, verified against its tokens, or None."""
        block_id = self.cached.get(request.block_hashes[index])
        if block_id is None:
            return None
        block = self.blocks[block_id]
        parent = request.block_hashes[index - 1] if index else _ROOT_HASH
        tokens = tuple(request.token_ids[index * self.block_size:(index + 1) * self.block_size])
        if block.parent_hash != parent or block.token_ids != tokens:
            return None
        return block_id

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The longest run of cached full blocks that start ``request``'s tokens, and how many tokens they cover.

        At most ``num_tokens - 1`` tokens are reused: the last token is always recomputed, since its hidden state
        is needed to sample. The hit-rate statistics are updated by ``record_prefix_hits`` once the request is
        admitted, so a request that waits for blocks is counted once. A request that does not read the cache
        (``reads_prefix_cache``) gets no blocks.
        """
        if not self.reads_prefix_cache(request):
            return [], 0
        num_full_blocks = (request.num_tokens - 1) // self.block_size
        self._hash_blocks(request, num_full_blocks)
        hits: list[int] = []
        for index in range(num_full_blocks):
            block_id = self._lookup(request, index)
            if block_id is None:
                break
            hits.append(block_id)
        return hits, len(hits) * self.block_size

    def reads_prefix_cache(self, request: Request) -> bool:
        """Whether ``request`` may start from cached blocks: not while it still needs prompt logprobs, which come
        from the logits of every prompt position (vLLM skips the cache for them too); its blocks are still cached
        for others."""
        return self.enable_prefix_caching and not request.needs_prompt_logprobs

    def record_prefix_hits(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        """Count an admitted request's prompt lookup in the hit-rate statistics."""
        if self.enable_prefix_caching:
            self.num_queried_tokens += num_queried_tokens
            self.num_hit_tokens += num_hit_tokens

    def allocate_slots(self, request: Request, num_new_tokens: int, computed_blocks: list[int] = ()) -> bool:
        """Give ``request`` the blocks for its next ``num_new_tokens`` tokens; False (nothing changed) if too few.

        ``computed_blocks`` (from ``get_computed_blocks``, only for a request with no blocks yet) are taken over
        first. Afterwards the request owns blocks for ``num_computed_tokens + len(computed_blocks) * block_size +
        num_new_tokens`` tokens, and every full block among them is registered in the prefix cache: its KV is
        written by this step's forward pass, before any attention reads it.
        """
        num_tokens = request.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        if not computed_blocks and num_tokens <= len(request.block_ids) * self.block_size and (
                not self.enable_prefix_caching or num_tokens // self.block_size <= request.num_cached_blocks):
            return True  # the common decode step: room in the last block, no block filled
        num_new_blocks = self.blocks_for_tokens(num_tokens) - len(request.block_ids) - len(computed_blocks)
        num_revived = (sum(1 for block_id in computed_blocks if self.blocks[block_id].ref_count == 0)
                       if computed_blocks else 0)
        if max(num_new_blocks, 0) + num_revived > len(self.free_queue):
            return False
        for block_id in computed_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_queue[block_id]
            block.ref_count += 1
        if computed_blocks:
            request.block_ids.extend(computed_blocks)
            request.num_cached_blocks = len(request.block_ids)
        for _ in range(max(num_new_blocks, 0)):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            self._uncache(block)
            block.ref_count = 1
            request.block_ids.append(block_id)
        num_full_blocks = num_tokens // self.block_size
        if num_full_blocks and request.token_ids[num_full_blocks * self.block_size - 1] == PENDING_TOKEN:
            num_full_blocks -= 1  # its last token is not known yet: registered by a later step's allocation
        if self.enable_prefix_caching and num_full_blocks > request.num_cached_blocks:
            self._cache_full_blocks(request, num_full_blocks)
        return True

    def _cache_full_blocks(self, request: Request, num_full_blocks: int) -> None:
        """Register the request's blocks up to ``num_full_blocks`` in the prefix cache."""
        self._hash_blocks(request, num_full_blocks)
        size = self.block_size
        for index in range(request.num_cached_blocks, num_full_blocks):
            block_hash = request.block_hashes[index]
            if block_hash in self.cached:
                continue
            block = self.blocks[request.block_ids[index]]
            block.block_hash = block_hash
            block.parent_hash = request.block_hashes[index - 1] if index else _ROOT_HASH
            block.token_ids = tuple(request.token_ids[index * size:(index + 1) * size])
            self.cached[block_hash] = block.block_id
        request.num_cached_blocks = max(request.num_cached_blocks, num_full_blocks)

    def _uncache(self, block: Block) -> None:
        """Drop ``block`` from the prefix cache (its KV is about to be overwritten)."""
        if block.block_hash is not None and self.cached.get(block.block_hash) == block.block_id:
            del self.cached[block.block_hash]
        block.block_hash = None
        block.parent_hash = None
        block.token_ids = None

    def free(self, request: Request) -> None:
        """Release the request's blocks, last block first; blocks that still cache a prefix stay reusable."""
        for block_id in reversed(request.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None
                if block.block_hash is None:
                    self.free_queue.move_to_end(block_id, last=False)
        request.block_ids = []  # a new list: InputBuffers rewrites the request's block-table row
        request.num_cached_blocks = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix and zero the hit-rate statistics; blocks in use are unaffected."""
        for block in self.blocks:
            self._uncache(block)
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0
