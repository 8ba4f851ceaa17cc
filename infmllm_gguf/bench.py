"""Benchmarks that print figures; speed claims are shown here, never asserted in unit tests."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from .runtime import Runtime


@dataclass(frozen=True)
class Rate:
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values) -> "Rate":
        return cls(float(np.median(values)), float(np.min(values)), float(np.max(values)))


@dataclass(frozen=True)
class CaptureOverhead:
    """Tokens/s of prefill and decode with capture off and on, measured interleaved in one context."""

    model: str
    device: str
    prompt_tokens: int
    chunk: int
    decode_tokens: int
    window: int
    prefill_off: Rate
    prefill_on: Rate
    decode_off: Rate
    decode_on: Rate

    def overhead(self, phase: str) -> float:
        off, on = getattr(self, f"{phase}_off").median, getattr(self, f"{phase}_on").median
        return off / on - 1.0

    def table(self) -> str:
        rows = [f"capture overhead: {self.model} on {self.device}; prompt {self.prompt_tokens} tokens in chunks of "
                f"{self.chunk}, {self.decode_tokens} decode steps, window {self.window}",
                f"{'phase':8s} {'capture off tok/s':>24s} {'capture on tok/s':>24s} {'overhead':>9s}"]
        for phase in ("prefill", "decode"):
            off, on = getattr(self, f"{phase}_off"), getattr(self, f"{phase}_on")
            rows.append(f"{phase:8s} {off.median:10.1f} [{off.min:6.1f},{off.max:6.1f}] "
                        f"{on.median:10.1f} [{on.min:6.1f},{on.max:6.1f}] {self.overhead(phase):+8.1%}")
        return "\n".join(rows)

    def to_json(self) -> dict:
        return asdict(self) | {"prefill_overhead": self.overhead("prefill"), "decode_overhead": self.overhead("decode")}


def capture_overhead(model_path=None, *, prompt_tokens: int = 512, chunk: int = 256, decode_tokens: int = 64,
                     window: int = 32, repeats: int = 5, n_gpu_layers: int = -1, flash_attn: bool | None = None,
                     seed: int = 0) -> CaptureOverhead:
    """Prefill `prompt_tokens` random tokens in chunks of `chunk`, then decode `decode_tokens` one by one,
    alternating capture off and on `repeats` times each (decode steps capture a window of 1)."""
    rng = np.random.default_rng(seed)
    n_ctx = -(-(prompt_tokens + decode_tokens) // 256) * 256
    with Runtime(model_path, n_ctx=n_ctx, n_batch=chunk, n_gpu_layers=n_gpu_layers, flash_attn=flash_attn) as rt:
        prompt = rng.integers(0, rt.n_vocab, prompt_tokens).tolist()
        steps = rng.integers(0, rt.n_vocab, decode_tokens).tolist()
        results: dict[str, list[float]] = {k: [] for k in ("prefill_off", "prefill_on", "decode_off", "decode_on")}

        def run(capture: bool) -> None:
            rt.clear()
            rt.capture_scores(window if capture else 0)
            t0 = time.perf_counter()
            for i in range(0, prompt_tokens, chunk):
                rt.decode(prompt[i:i + chunk], range(i, min(i + chunk, prompt_tokens)))
            rt.logits()  # waits for the device
            t1 = time.perf_counter()
            rt.capture_scores(1 if capture else 0)
            for tok in steps:
                rt.decode([tok])
                rt.logits()
            t2 = time.perf_counter()
            tag = "on" if capture else "off"
            results[f"prefill_{tag}"].append(prompt_tokens / (t1 - t0))
            results[f"decode_{tag}"].append(decode_tokens / (t2 - t1))

        run(False)  # warm-up: graph allocation, weight repacking
        run(True)
        for _ in range(repeats):
            run(False)
            run(True)
        device = "GPU" if n_gpu_layers != 0 and gpu_offload_supported() else "CPU"
        return CaptureOverhead(rt.model_path.name, device, prompt_tokens, chunk, decode_tokens, window,
                               **{k: Rate.of(v) for k, v in results.items()})


def gpu_offload_supported() -> bool:
    from llama_cpp import llama_cpp as llama
    return bool(llama.llama_supports_gpu_offload())
