"""infmllm-gguf: streaming inference through llama.cpp in a KV cache of fixed size (Inf-MLLM)."""

__all__ = ["StreamSession"]


def __getattr__(name: str):
    # lazy: `python -m infmllm_gguf.models fetch` must not load llama.cpp
    if name == "StreamSession":
        from .session import StreamSession
        return StreamSession
    raise AttributeError(f"module 'infmllm_gguf' has no attribute {name!r}")
