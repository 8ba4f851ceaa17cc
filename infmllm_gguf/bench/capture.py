"""Capture overhead: prefill and decode tokens/s with score capture off and on, interleaved."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from ..policies import DEFAULT_POLICY, make_policy
from ..probes import device_label
from ..runtime import Model, Runtime
from .common import Rate


@dataclass(frozen=True)
class CaptureOverhead:
    """Tokens/s of prefill and decode with capture off and on, measured interleaved in one context."""

    model: str
    device: str
    prompt_tokens: int
    chunk: int
    decode_tokens: int
    capture_queries: int
    generation_headroom: int   # decode: eviction every this many steps...
    decode_read_steps: int     # ...whose last this many the default policy reads, and generation captures
    prefill_off: Rate
    prefill_on: Rate
    decode_off: Rate
    decode_on: Rate            # the steps generation captures
    decode_every_on: Rate      # every step captured (before generation skipped the unread ones)

    def overhead(self, phase: str) -> float:
        off, on = getattr(self, f"{phase}_off").median, getattr(self, f"{phase}_on").median
        return off / on - 1.0

    def table(self) -> str:
        rows = [f"capture overhead: {self.model} on {self.device}; prompt {self.prompt_tokens} tokens in chunks of "
                f"{self.chunk}, the last {self.capture_queries} queries of each captured; {self.decode_tokens} "
                f"decode steps, the last {self.decode_read_steps} of every {self.generation_headroom} captured "
                "(decode) or all of them (decode every)",
                f"{'phase':12s} {'capture off tok/s':>24s} {'capture on tok/s':>24s} {'overhead':>9s}"]
        for phase, off_name in (("prefill", "prefill"), ("decode", "decode"), ("decode_every", "decode")):
            off, on = getattr(self, f"{off_name}_off"), getattr(self, f"{phase}_on")
            rows.append(f"{phase.replace('_', ' '):12s} {off.median:10.1f} [{off.min:6.1f},{off.max:6.1f}] "
                        f"{on.median:10.1f} [{on.min:6.1f},{on.max:6.1f}] {off.median / on.median - 1:+8.1%}")
        return "\n".join(rows)

    def to_json(self) -> dict:
        return asdict(self) | {"prefill_overhead": self.overhead("prefill"), "decode_overhead": self.overhead("decode"),
                               "decode_every_overhead": self.decode_off.median / self.decode_every_on.median - 1.0}


def capture_overhead(model=None, *, prompt_tokens: int = 512, chunk: int = 256, decode_tokens: int = 256,
                     capture_queries: int = 32, generation_headroom: int | None = None, repeats: int = 5,
                     n_gpu_layers: int = -1, flash_attn: bool | None = None, n_threads: int | None = None,
                     cache_type_k: str = "f16", cache_type_v: str = "f16", rpc: Sequence[str] = (),
                     seed: int = 0) -> CaptureOverhead:
    """Prefill `prompt_tokens` random tokens in chunks of `chunk`, then decode `decode_tokens` one by one,
    alternating capture off, on and on at every step, `repeats` times each. "On" decodes capture as
    generation does (`CacheController.reads_generation_step`): eviction every `generation_headroom`
    steps (default: the chunk, as in `StreamSession`), and of those the last ones that the default
    policy reads."""
    rng = np.random.default_rng(seed)
    headroom = generation_headroom or chunk
    read_steps = make_policy(DEFAULT_POLICY).capture_queries(headroom)
    read = [i % headroom >= headroom - read_steps for i in range(decode_tokens)]
    n_ctx = -(-(prompt_tokens + decode_tokens) // 256) * 256
    with Model(model, n_gpu_layers=n_gpu_layers, rpc=rpc) as loaded, \
            Runtime(loaded, n_ctx=n_ctx, n_batch=chunk, flash_attn=flash_attn, n_threads=n_threads,
                    cache_type_k=cache_type_k, cache_type_v=cache_type_v) as rt:
        prompt = rng.integers(0, rt.model.n_vocab, prompt_tokens).tolist()
        steps = rng.integers(0, rt.model.n_vocab, decode_tokens).tolist()
        results: dict[str, list[float]] = {k: [] for k in ("prefill_off", "prefill_on", "decode_off", "decode_on",
                                                           "decode_every_on")}

        def run(mode: str) -> None:
            rt.clear()
            rt.capture_scores(0 if mode == "off" else capture_queries)
            t0 = time.perf_counter()
            for i in range(0, prompt_tokens, chunk):
                rt.decode(prompt[i:i + chunk], range(i, min(i + chunk, prompt_tokens)))
            rt.logits()  # waits for the device
            t1 = time.perf_counter()
            captured = None
            for tok, is_read in zip(steps, read):
                capture = int(mode == "every" or (mode == "on" and is_read))
                if capture != captured:  # as the controller: a change of setting, and only then
                    rt.capture_scores(capture)
                    captured = capture
                rt.decode([tok])
                rt.logits()
            t2 = time.perf_counter()
            if mode != "every":
                results[f"prefill_{mode}"].append(prompt_tokens / (t1 - t0))
            results["decode_every_on" if mode == "every" else f"decode_{mode}"].append(decode_tokens / (t2 - t1))

        for mode in ("off", "on", "every"):  # warm-up: graph allocation, weight repacking
            run(mode)
        for k in results:
            results[k].clear()
        for _ in range(repeats):
            for mode in ("off", "on", "every"):
                run(mode)
        return CaptureOverhead(rt.model.name, device_label(n_gpu_layers, n_threads), prompt_tokens, chunk,
                               decode_tokens, capture_queries, headroom, read_steps,
                               **{k: Rate.of(v) for k, v in results.items()})
