"""infmllm-gguf: streaming inference through llama.cpp in a KV cache of fixed size (Inf-MLLM)."""

from .session import StreamSession

__all__ = ["StreamSession"]
