"""Deprecated name of `infmllm_gguf.controller` (the cache controller): it works, with a
DeprecationWarning, until the next release."""
import warnings

from .controller import *  # noqa: F401,F403
from .controller import CacheController, CacheStats, queries_seen, runs  # noqa: F401

warnings.warn("infmllm_gguf.cache is now infmllm_gguf.controller", DeprecationWarning, stacklevel=2)
