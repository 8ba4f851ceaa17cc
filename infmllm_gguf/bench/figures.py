"""The measured medians that the benchmark's targets are about."""
from __future__ import annotations

import numpy as np

from ..policies import Full
from ..runtime.plain import PLAIN
from .capture import CaptureOverhead
from .stream import BASELINE_TARGETS, StreamBench


def figures(capture: CaptureOverhead | None, stream: StreamBench | None, memory=None) -> list[dict]:
    """The measured medians that the benchmark's targets are about: {"figure", "run", "policy",
    "budget", "value"} (run, policy and budget None for the capture figures); `memory`: a
    `memory.cost.MemoryCost`."""
    out = []

    def add(figure: str, value: float | None, run: str | None = None, config: dict | None = None) -> None:
        if value is not None and not np.isnan(value):
            out.append({"figure": figure, "run": run, "policy": config and config["name"],
                        "budget": config and config["budget"], "value": float(value)})

    if capture is not None:
        add("capture overhead, prefill", capture.overhead("prefill"))
        add("capture overhead, decode", capture.overhead("decode"))
    if stream is not None:
        for s in stream.summaries():
            if s.policy["name"] in (Full.name, PLAIN):
                continue
            add("eviction + re-indexing share of stream time", s.evict_share.median, s.label, s.policy)
            add("tokens/s, last 10% of the stream / first 10%", s.last_vs_first.median, s.label, s.policy)
            add("peak RSS growth after the first 10%", s.rss_growth.median if s.rss_growth else None,
                s.label, s.policy)
        for sp in stream.speedups():
            add("inf-mllm / h2o tokens/s", sp["inf_mllm_over_h2o"].median, sp["inf_mllm"],
                {"name": "inf-mllm", "budget": sp["budget"]})
        for r in stream.over_baseline():
            if r["policy"] in BASELINE_TARGETS:
                add(f"{r['policy']} / {PLAIN} tokens/s", r["over_plain"].median, r["run"],
                    {"name": r["policy"], "budget": r["budget"]})
    if memory is not None:
        run = f"{memory.policy['name']} {memory.policy['budget']}, {memory.memory_tokens} tokens in memory"
        add("memory on / off tokens/s", memory.speed_ratio.median, run, memory.policy)
        add("first answer token, memory on / off", memory.first_token_ratio.median, run, memory.policy)
    return out
