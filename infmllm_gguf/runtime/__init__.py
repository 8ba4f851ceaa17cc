"""The one door to llama.cpp: every call into llama-cpp-python's bindings goes through here.

`Model` holds a GGUF's weights and vocabulary; `Runtime` is one context decoding one sequence
over a model, with the attention-score capture of `patches/` (`native`, its ctypes mirror);
`mtmd.VisionEncoder` is libmtmd's image encoder; `sampler.ChainSampler` is llama.cpp's sampler chain
(`SamplerOptions`: its options and their defaults). Nothing here changes process-wide state at
import: llama.cpp's backends and log callback are set up when the first model loads.
"""
from .capture import AttentionScores, CaptureError
from .cell_state import SEQ
from .runtime import CACHE_TYPES, Runtime, check_cache_types
from .model import Model, parse_endpoint, supports_gpu_offload, system_info
from .native import UnpatchedLlamaError
from .sampler import ChainSampler, SamplerOptions, json_schema_grammar

__all__ = ["CACHE_TYPES", "SEQ", "AttentionScores", "CaptureError", "ChainSampler", "Model", "Runtime",
           "SamplerOptions", "UnpatchedLlamaError", "check_cache_types", "json_schema_grammar", "parse_endpoint",
           "supports_gpu_offload", "system_info"]
