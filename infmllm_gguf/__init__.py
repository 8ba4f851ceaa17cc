"""infmllm-gguf: streaming inference through llama.cpp in a KV cache of fixed size (Inf-MLLM)."""

__all__ = ["Llama", "SessionConfig", "StreamSession"]


def __getattr__(name: str):
    # lazy: `python -m infmllm_gguf.model_files fetch` must not load llama.cpp
    if name in ("StreamSession", "SessionConfig"):
        from . import session
        return getattr(session, name)
    if name == "Llama":  # llama-cpp-python's class, over a bounded stream
        from .llama_compat import Llama
        return Llama
    raise AttributeError(f"module 'infmllm_gguf' has no attribute {name!r}")
