"""KVCacheManager: which blocks each request holds, prefix-cache hits, and slot allocation. No torch.

A request's block list covers tokens [0, len(blocks) * block_size). Its first blocks may be shared with
other requests (prefix-cache hits); those are full and never written again. Only blocks whose tokens are
all computed get a hash, so a hit always refers to KV that exists.
"""

from __future__ import annotations

from pagoda.core.block_pool import BlockHash, BlockPool, KVBlock, hash_block_tokens
from pagoda.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self._blocks: dict[str, list[KVBlock]] = {}
        self._block_ids: dict[str, list[int]] = {}  # mirrors _blocks, handed to the runner each step
        self._hashes: dict[str, list[BlockHash]] = {}  # hashes of the request's full blocks, in order
        self._num_registered: dict[str, int] = {}  # how many of its blocks are indexed already

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def block_ids(self, request_id: str) -> list[int]:
        return self._block_ids[request_id]

    def _full_block_hashes(self, request: Request, num_tokens: int) -> list[BlockHash]:
        """Hashes of the request's full blocks within its first num_tokens tokens (extended lazily)."""
        hashes = self._hashes.setdefault(request.request_id, [])
        tokens = request.all_token_ids
        bs = self.block_size
        for i in range(len(hashes), num_tokens // bs):
            hashes.append(hash_block_tokens(hashes[-1] if hashes else None, tokens[i * bs:(i + 1) * bs]))
        return hashes

    def find_cached_prefix(self, request: Request) -> list[KVBlock]:
        """Longest run of indexed blocks matching the request's leading tokens.

        Capped below num_tokens: the last token is always computed, since its logits are needed; and at the
        request's max_prefix_hit_tokens (positions whose prompt logprobs are still to be computed).
        """
        if not self.pool.enable_caching:
            return []
        max_hit_tokens = request.num_tokens - 1
        if request.max_prefix_hit_tokens is not None:
            max_hit_tokens = min(max_hit_tokens, request.max_prefix_hit_tokens)
        max_hit_blocks = max_hit_tokens // self.block_size
        hits: list[KVBlock] = []
        for block_hash in self._full_block_hashes(request, max_hit_blocks * self.block_size):
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def allocate_slots(self, request: Request, num_new_tokens: int, cached_blocks: list[KVBlock] = ()) -> bool:
        """Make room for num_new_tokens more tokens after the request's computed (or cached) ones.

        Returns False, changing nothing, if the pool cannot supply the blocks; the scheduler decides what
        to do about it.
        """
        blocks = self._blocks.setdefault(request.request_id, [])
        block_ids = self._block_ids.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(cached_blocks) * self.block_size
        num_needed = -(-(num_computed + num_new_tokens) // self.block_size) - len(blocks) - len(cached_blocks)
        # Cached hits sitting in the free queue stop being free when we take them.
        num_revived = sum(1 for b in cached_blocks if b.ref_cnt == 0)
        if num_needed > self.pool.num_free_blocks - num_revived:
            return False
        if cached_blocks:
            self.pool.touch(cached_blocks)
            blocks.extend(cached_blocks)
            block_ids.extend(b.block_id for b in cached_blocks)
            self._num_registered[request.request_id] = len(blocks)
        if num_needed > 0:
            new_blocks = self.pool.allocate(num_needed)
            assert new_blocks is not None
            blocks.extend(new_blocks)
            block_ids.extend(b.block_id for b in new_blocks)
        return True

    def cache_computed_blocks(self, request: Request) -> None:
        """Index the request's blocks that became full and computed (call after each step)."""
        if not self.pool.enable_caching:
            return
        blocks = self._blocks.get(request.request_id)
        if not blocks:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(blocks))
        start = self._num_registered.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self._full_block_hashes(request, num_full * self.block_size)
        for i in range(start, num_full):
            self.pool.register(blocks[i], hashes[i])
        self._num_registered[request.request_id] = num_full

    def free(self, request: Request) -> None:
        """Return the request's blocks. Tail blocks go first into the free queue, so they are evicted
        before the shared-looking head blocks."""
        blocks = self._blocks.pop(request.request_id, [])
        self._block_ids.pop(request.request_id, None)
        self._num_registered.pop(request.request_id, None)
        self._hashes.pop(request.request_id, None)
        self.pool.free(reversed(blocks))

    def num_held_blocks(self, request_id: str) -> int:
        return len(self._blocks.get(request_id, ()))

    def check_integrity(self) -> None:
        self.pool.check_integrity()
        held: dict[int, int] = {}
        for blocks in self._blocks.values():
            for b in blocks:
                held[b.block_id] = held.get(b.block_id, 0) + 1
        for block in self.pool.blocks:
            assert held.get(block.block_id, 0) == block.ref_cnt, (
                f"block {block.block_id}: ref_cnt {block.ref_cnt} but held by {held.get(block.block_id, 0)} requests"
            )
