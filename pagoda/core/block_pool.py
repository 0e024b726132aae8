"""BlockPool: every KV block, made once; reference counts; the free queue; the prefix-cache index.

Invariants (checked by `check_integrity`):
- a block is in the free queue iff its ref_cnt is 0;
- a block with a hash is the one block the index maps that hash to, and its KV holds exactly the tokens
  the hash names (blocks are registered only after their KV has been written);
- free blocks keep their hash until they are handed out again, so a later request can revive them (a
  prefix-cache hit); the free queue is LRU, so the blocks freed longest ago are reused first.
No torch here: the pool only deals in block ids; the tensors live in the worker.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

BlockHash = bytes


def hash_block_tokens(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Hash of a full block given its parent's hash: equal hashes mean equal whole prefixes."""
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.digest()


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks <= 0:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[BlockHash, KVBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached-but-free blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def allocate(self, n: int) -> list[KVBlock] | None:
        """n fresh blocks with ref_cnt 1, or None (and no change) if fewer than n are free."""
        if n > len(self._free):
            return None
        out = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:  # evict its old contents from the index
                del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        return out

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference from each block; blocks reaching zero join the free queue in the given order."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"block {block.block_id} freed more often than taken")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    def lookup(self, block_hash: BlockHash) -> KVBlock | None:
        return self._cached.get(block_hash) if self.enable_caching else None

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on blocks found by lookup (reviving them if they were free)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def register(self, block: KVBlock, block_hash: BlockHash) -> None:
        """Index a full, written block under its hash. A duplicate of an indexed block stays unindexed."""
        if not self.enable_caching or block.block_hash is not None or block_hash in self._cached:
            return
        block.block_hash = block_hash
        self._cached[block_hash] = block

    def reset_prefix_cache(self) -> None:
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()

    def check_integrity(self) -> None:
        for block in self.blocks:
            in_free = block.block_id in self._free
            assert block.ref_cnt >= 0, f"block {block.block_id} has ref_cnt {block.ref_cnt}"
            assert in_free == (block.ref_cnt == 0), f"block {block.block_id}: ref_cnt {block.ref_cnt}, free={in_free}"
            if block.block_hash is not None:
                assert self._cached.get(block.block_hash) is block, f"block {block.block_id} hash not indexed"
        for block_hash, block in self._cached.items():
            assert block.block_hash == block_hash, f"index entry points at block {block.block_id} with another hash"
