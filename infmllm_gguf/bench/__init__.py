"""Benchmarks that print figures; speed claims are shown here, never asserted in unit tests.

One module per part, each measured in one process:

* `capture`: prefill and decode tokens/s with score capture off vs on, interleaved; decode captures
  the steps that generation captures (the last `window` of every `generation_headroom`),
  and, for comparison, every step;
* `stream`: each policy streams the same tokens through a `StreamSession`, beside the plain
  llama.cpp baseline (`runtime.plain`: StreamingLLM in llama-cpp-python alone); per segment of the
  stream it records tokens/s, time spent evicting and re-indexing (`CacheStats.evict_s`) and
  reading scores (`capture_s`), resident memory (VmRSS) and, on CUDA, GPU memory. Runs are
  interleaved: repeat r starts at the r-th run of the list, so machine drift spreads over all of
  them; each policy's tokens/s over the baseline's is paired within a repeat;
* `kv`: per KV cache type, bytes per cell, the attention scores against those of an f16 cache, and
  the default policy's perplexity at a budget;
* `rpc`: a stream with the layers on two local rpc-servers behind byte-counting relays: bytes over
  the network per token, and tokens/s against the same stream on this process alone;
* `memory`: what the memory tier costs, with memory on and off side by side.

`figures.figures()` names the measured values that the command holds against its targets;
`common` holds what the parts share.
"""
