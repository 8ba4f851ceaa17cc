"""Deprecated name of `infmllm_gguf.runtime.runtime` (the `Runtime` class: one context decoding one
sequence): it works, with a DeprecationWarning, until the next release."""
import warnings

from .runtime import *  # noqa: F401,F403
from .runtime import CACHE_TYPES, SEQ, AttentionScores, CaptureError, Runtime, check_cache_types, new_context  # noqa: F401

warnings.warn("infmllm_gguf.runtime.context is now infmllm_gguf.runtime.runtime", DeprecationWarning, stacklevel=2)
