"""The memory tier beyond the budget: the stream's evicted text comes back when a prompt needs it."""
from .ranking import attention_mass, block_starts, bm25, choose
from .tier import RANKINGS, Memory, MemoryConfig, MemoryStats, TokenStore

__all__ = ["RANKINGS", "Memory", "MemoryConfig", "MemoryStats", "TokenStore", "attention_mass", "block_starts",
           "bm25", "choose"]
