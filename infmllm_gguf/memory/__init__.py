"""The memory tier beyond the budget: the stream's evicted text comes back when a prompt needs it."""
from .ranking import block_starts, bm25, choose
from .store import TokenStore
from .tier import RANKINGS, STORES, Memory, MemoryConfig, MemoryStats, memory_for, memory_label

__all__ = ["RANKINGS", "STORES", "Memory", "MemoryConfig", "MemoryStats", "TokenStore", "block_starts", "bm25", "memory_for",
           "memory_label", "choose"]
