"""Cache blocks: a free list and per-sequence block tables. A block holds `block_size` tokens."""

from __future__ import annotations


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free_blocks: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out 0, 1, ...

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free_blocks)

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def extra_blocks_needed(self, block_table: list[int], num_tokens: int) -> int:
        """Blocks to add to `block_table` so that it holds `num_tokens` tokens."""
        return max(0, self.blocks_for_tokens(num_tokens) - len(block_table))

    def can_grow(self, block_table: list[int], num_tokens: int) -> bool:
        return self.extra_blocks_needed(block_table, num_tokens) <= len(self._free_blocks)

    def grow(self, block_table: list[int], num_tokens: int) -> None:
        """Append free blocks to `block_table` until it holds `num_tokens` tokens."""
        needed = self.extra_blocks_needed(block_table, num_tokens)
        if needed > len(self._free_blocks):
            raise RuntimeError(f"out of cache blocks: need {needed}, {len(self._free_blocks)} free")
        for _ in range(needed):
            block_table.append(self._free_blocks.pop())

    def free(self, block_table: list[int]) -> None:
        """Return every block of `block_table` to the free list and empty it."""
        self._free_blocks.extend(reversed(block_table))
        block_table.clear()
