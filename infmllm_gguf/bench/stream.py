"""Streaming: each policy streams the same tokens beside the plain llama.cpp baseline."""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import ClassVar, Sequence

import numpy as np

from ..extras import pyplot
from ..policies import DEFAULT_POLICY, Full, Policy, StreamingLLM, from_config
from ..probes import GpuMemory, device_label, rss_mib
from ..runtime import Model
from ..runtime.plain import PLAIN, PlainStream
from ..segments import Segment, SegmentClock, tokens_per_s
from ..session import StreamSession
from .common import Rate, stream_tokens


@dataclass(frozen=True)
class PlainBaseline:
    """The baseline run beside the policies: `runtime.plain.PlainStream` at a budget, keeping the
    first `sinks` tokens as `streaming-llm` does."""
    budget: int
    sinks: int = StreamingLLM.sinks
    evicts: ClassVar[bool] = True

    def config(self) -> dict:
        return {"name": PLAIN, "budget": self.budget, "sinks": self.sinks}

    def label(self) -> str:
        return f"{PLAIN}, budget {self.budget}"


def run_label(config: dict) -> str:
    """The label of a stream run's configuration: a policy's, or the baseline's."""
    return PlainBaseline(config["budget"], config["sinks"]).label() if config["name"] == PLAIN \
        else from_config(config).label()


def with_baselines(policies: Sequence[Policy]) -> list[Policy | PlainBaseline]:
    """`policies`, then one plain llama.cpp baseline per budget of the bounded ones."""
    budgets = dict.fromkeys(p.budget for p in policies if p.evicts)
    return list(policies) + [PlainBaseline(b) for b in budgets]


def unshifted(policy: Policy) -> Policy:
    """`policy` for a stream whose positions are not re-indexed: per-layer compaction moves every
    cell to a new position, so "auto" decides once for all layers there, and "layer" cannot run."""
    granularity = getattr(policy, "granularity", "token")
    if granularity == "layer":
        raise ValueError("--no-reindex keeps every cell at its position, and per-layer eviction moves cells to "
                         "new ones: use --granularity token (or auto)")
    return dataclasses.replace(policy, granularity="token") if granularity == "auto" else policy


def bounded_by_context(policies: Sequence[Policy], context: int) -> list[Policy]:
    """The policies of a stream benchmark: `full` runs once, with a budget of `context` (it keeps
    every token, up to the context that it may fill)."""
    out = [p if p.evicts else p.with_budget(context) for p in policies]
    return list({tuple(p.config().items()): p for p in out}.values())


@dataclass
class StreamRun:
    policy: dict              # Policy.config(); full's budget is the context it was given
    repeat: int
    tokens: int               # streamed (full stops at its budget)
    stopped_at: int | None    # full: where the stream outgrew the context, else None
    seconds: float
    decode_s: float
    evict_s: float
    capture_s: float
    peak_cells: int
    cells_evicted: int
    rss_start_mib: float | None  # after loading and one warm-up chunk, before streaming
    segments: list[Segment] = field(repr=False)

    @property
    def label(self) -> str:
        return run_label(self.policy)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def tenth(self) -> int:
        """Segments in a tenth of the stream (at least one)."""
        return max(1, round(len(self.segments) / 10))

    def rate(self, i: int, j: int) -> float:
        """Tokens/s over segments [i, j)."""
        start = self.segments[i - 1].tokens if i > 0 else 0
        return (self.segments[j - 1].tokens - start) / sum(s.seconds for s in self.segments[i:j])

    def first_last(self) -> tuple[float, float]:
        """Tokens/s over the first and the last tenth of the stream."""
        n, k = len(self.segments), self.tenth
        return self.rate(0, k), self.rate(n - k, n)

    def peak(self, key: str, first_tenth: bool = False) -> float | None:
        """The largest `rss_mib` or `gpu_mib` sampled (over the first tenth only, or the whole stream)."""
        segs = self.segments[:self.tenth] if first_tenth else self.segments
        values = [getattr(s, key) for s in segs if getattr(s, key) is not None]
        return max(values) if values else None


def _rate_or_none(values: list) -> Rate | None:
    values = [v for v in values if v is not None]
    return Rate.of(values) if values else None


@dataclass(frozen=True)
class StreamSummary:
    """One policy configuration over the repeats: medians with min and max."""
    policy: dict
    tokens: int
    stopped_at: int | None
    tokens_per_s: Rate
    first10_tokens_per_s: Rate
    last10_tokens_per_s: Rate
    last_vs_first: Rate          # last tenth's tokens/s over the first tenth's, per repeat
    evict_ms_per_1k: Rate        # eviction and re-indexing per 1,000 streamed tokens
    evict_share: Rate            # of stream time
    capture_share: Rate          # of stream time: reading and aligning scores
    rss_first10_mib: Rate | None  # peak resident memory over the first tenth of the stream
    rss_peak_mib: Rate | None     # over the whole stream
    rss_growth: Rate | None       # peak / first tenth's peak - 1
    gpu_first10_mib: Rate | None
    gpu_peak_mib: Rate | None

    @property
    def label(self) -> str:
        return run_label(self.policy)

    @classmethod
    def of(cls, runs: Sequence[StreamRun]) -> "StreamSummary":
        r0 = runs[0]
        first_last = [r.first_last() for r in runs]
        rss = [(r.peak("rss_mib", True), r.peak("rss_mib")) for r in runs]
        gpu = [(r.peak("gpu_mib", True), r.peak("gpu_mib")) for r in runs]
        return cls(
            r0.policy, r0.tokens, r0.stopped_at,
            tokens_per_s=Rate.of([r.tokens_per_s for r in runs]),
            first10_tokens_per_s=Rate.of([f for f, _ in first_last]),
            last10_tokens_per_s=Rate.of([last for _, last in first_last]),
            last_vs_first=Rate.of([last / f for f, last in first_last]),
            evict_ms_per_1k=Rate.of([1e6 * r.evict_s / r.tokens for r in runs]),
            evict_share=Rate.of([r.evict_s / r.seconds for r in runs]),
            capture_share=Rate.of([r.capture_s / r.seconds for r in runs]),
            rss_first10_mib=_rate_or_none([f for f, _ in rss]),
            rss_peak_mib=_rate_or_none([p for _, p in rss]),
            rss_growth=_rate_or_none([p / f - 1 if f else None for f, p in rss]),
            gpu_first10_mib=_rate_or_none([f for f, _ in gpu]),
            gpu_peak_mib=_rate_or_none([p for _, p in gpu]),
        )


@dataclass(frozen=True)
class StreamBench:
    model: str
    device: str
    source: str
    tokens: int
    chunk: int
    segment: int
    repeats: int
    reindex: bool
    gpu_memory_scope: str | None  # "process" or "device" (a container hid the pid), None on the CPU
    runs: list[StreamRun]

    def _by_config(self) -> dict[tuple, list[StreamRun]]:
        groups: dict[tuple, list[StreamRun]] = {}
        for r in self.runs:
            groups.setdefault(tuple(r.policy.items()), []).append(r)
        return groups

    def summaries(self) -> list[StreamSummary]:
        return [StreamSummary.of(runs) for runs in self._by_config().values()]

    def speedups(self) -> list[dict]:
        """inf-mllm over h2o at each budget, paired within a repeat (drift cancels)."""
        groups = list(self._by_config().values())
        out = []
        for fast in (g for g in groups if g[0].policy["name"] == "inf-mllm"):
            for slow in (g for g in groups if g[0].policy["name"] == "h2o"
                         and g[0].policy["budget"] == fast[0].policy["budget"]):
                pairs = [(a.tokens_per_s, b.tokens_per_s) for a in fast for b in slow if a.repeat == b.repeat]
                out.append({"budget": fast[0].policy["budget"], "inf_mllm": fast[0].label, "h2o": slow[0].label,
                            "inf_mllm_over_h2o": Rate.of([a / b for a, b in pairs])})
        return out

    def over_baseline(self) -> list[dict]:
        """Each configuration's tokens/s over the plain llama.cpp baseline's at its budget, paired
        within a repeat (drift cancels); `full` has no baseline."""
        groups = list(self._by_config().values())
        out = []
        for plain in (g for g in groups if g[0].policy["name"] == PLAIN):
            budget = plain[0].policy["budget"]
            for runs in (g for g in groups if g[0].policy["name"] not in (PLAIN, Full.name)
                         and g[0].policy["budget"] == budget):
                pairs = [(a.tokens_per_s, b.tokens_per_s) for a in runs for b in plain if a.repeat == b.repeat]
                out.append({"budget": budget, "run": runs[0].label, "policy": runs[0].policy["name"],
                            "over_plain": Rate.of([a / b for a, b in pairs])})
        return out

    def table(self) -> str:
        head = (f"stream: {self.model} on {self.device}; {self.tokens} tokens ({self.source}) in chunks of "
                f"{self.chunk}, segments of {self.segment}, {self.repeats} repeats, medians [min, max]"
                + ("" if self.reindex else "; positions NOT re-indexed"))
        summaries = self.summaries()
        width = max([len("policy")] + [len(s.label) for s in summaries])
        rows = [head, f"{'policy':{width}s} {'tokens':>8s} {'tok/s':>24s} {'last/first 10%':>22s} "
                      f"{'evict ms/1k':>10s} {'evict %':>8s} {'capture %':>9s} {'RSS MiB 10%->peak':>18s}"]
        for s in summaries:
            rss = (f"{s.rss_first10_mib.median:.0f} -> {s.rss_peak_mib.median:.0f}" if s.rss_peak_mib else "-")
            rows.append(f"{s.label:{width}s} {s.tokens:8d} {str(s.tokens_per_s):>24s} "
                        f"{str(s.last_vs_first):>22s} {s.evict_ms_per_1k.median:10.2f} "
                        f"{s.evict_share.median:8.2%} {s.capture_share.median:9.2%} {rss:>18s}")
            if s.stopped_at is not None:
                rows.append(f"{'':{width}s} full stopped at {s.stopped_at} tokens: the training context is full")
            if s.gpu_peak_mib:
                rows.append(f"{'':{width}s} GPU MiB ({self.gpu_memory_scope}) {s.gpu_first10_mib.median:.0f} "
                            f"-> {s.gpu_peak_mib.median:.0f}")
        for sp in self.speedups():
            rows.append(f"{sp['inf_mllm']} / {sp['h2o']}: {sp['inf_mllm_over_h2o']}x")
        for r in self.over_baseline():
            rows.append(f"{r['run']} / {PLAIN}: {r['over_plain']}x")
        return "\n".join(rows)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "runs"} | {
            "summary": [asdict(s) for s in self.summaries()],
            "speedups": [sp | {"inf_mllm_over_h2o": asdict(sp["inf_mllm_over_h2o"])} for sp in self.speedups()],
            "over_baseline": [r | {"over_plain": asdict(r["over_plain"])} for r in self.over_baseline()],
            "runs": [asdict(r) for r in self.runs],
        }


def stream_bench(model=None, *, policies: Sequence[Policy], tokens: int = 20000, chunk: int = 256,
                 segment: int = 1024, repeats: int = 3, source: str = "shakespeare", reindex: bool = True,
                 baseline: bool = True, n_gpu_layers: int = -1, flash_attn: bool | None = None,
                 n_threads: int | None = None, cache_type_k: str = "f16", cache_type_v: str = "f16",
                 rpc: Sequence[str] = (), progress: bool = False) -> StreamBench:
    """Stream `tokens` tokens through each of `policies` (a grid from `policy_grid`), `repeats`
    times, interleaved. `segment` is rounded up to whole chunks and `tokens` to whole segments, so
    that every segment measures the same work. `full` runs once, in the training context (see
    `bounded_by_context`). `reindex=False` keeps the original positions (no `seq_add`, no key
    re-rotation): a speed reference for what re-indexing costs. `baseline` adds, per budget, the plain
    llama.cpp stream (`PlainBaseline`). `progress` shows a bar on stderr."""
    from tqdm import tqdm

    segment = -(-segment // chunk) * chunk
    tokens = -(-tokens // segment) * segment
    kv = {"cache_type_k": cache_type_k, "cache_type_v": cache_type_v}
    with Model(model, n_gpu_layers=n_gpu_layers, rpc=rpc) as loaded:
        full_budget = min(tokens, loaded.n_ctx_train // chunk * chunk)  # the context full may fill
        policies = bounded_by_context(policies, full_budget)
        if baseline:
            policies = with_baselines(policies)
        token_ids = stream_tokens(loaded, tokens, source)
        gpu = GpuMemory.open(n_gpu_layers)
        planned = repeats * sum(tokens if p.evicts else full_budget for p in policies)
        # a log (not a terminal) gets a line every 30 s, so a long run shows how far it is
        bar = tqdm(total=planned, unit="tok", unit_scale=True, disable=not progress, leave=False,
                   mininterval=0.5 if sys.stderr.isatty() else 30)

        def open_stream(policy: Policy | PlainBaseline):
            """(stream, feed, wait): a session of the policy or the baseline's plain loop."""
            if isinstance(policy, PlainBaseline):
                p = PlainStream(loaded, budget=policy.budget, sinks=policy.sinks, chunk=chunk, flash_attn=flash_attn,
                                n_threads=n_threads, **kv)
                return p, p.feed, p.wait
            if not reindex:  # the controller's own path for models that cannot shift (positions keep growing)
                policy = unshifted(policy)
            s = StreamSession(loaded, policy, chunk=chunk, flash_attn=flash_attn, n_threads=n_threads, memory=False,
                              **kv)
            if not reindex:
                s.cache.keep_positions()
            return s, s.feed_tokens, s.runtime.logits

        def stream_one(policy: Policy | PlainBaseline, repeat: int) -> StreamRun:
            n = tokens if policy.evicts else min(tokens, policy.budget)
            stream, feed, wait = open_stream(policy)
            with stream:
                feed(token_ids[:chunk].tolist())  # warm-up: compute buffers, weight repacking, kernels
                stream.reset()
                rss_start = rss_mib()
                clock = SegmentClock(lambda: stream.stats, gpu)
                segments: list[Segment] = []
                for a in range(0, n, segment):
                    feed(token_ids[a:min(a + segment, n)].tolist())
                    wait()  # waits for the device
                    segments.append(clock.end(stream.stats.tokens_seen))
                    bar.set_description(f"{policy.label()} #{repeat}", refresh=False)
                    bar.update(stream.stats.tokens_seen - a)
                st = stream.stats
                ran = stream.policy if isinstance(stream, StreamSession) else policy  # granularity settled
                return StreamRun(ran.config(), repeat, n, n if n < tokens else None,
                                 sum(g.seconds for g in segments), st.decode_s, st.evict_s,
                                 st.capture_s, st.peak_cells, st.cells_evicted, rss_start, segments)

        results = []
        with bar:
            for r in range(repeats):
                order = list(policies[r % len(policies):]) + list(policies[:r % len(policies)])
                results.extend(stream_one(policy, r) for policy in order)
        name = loaded.name
    return StreamBench(name, device_label(n_gpu_layers, n_threads), source, tokens, chunk, segment, repeats,
                       reindex, gpu.scope if gpu else None, results)


#: the policies whose throughput over the plain baseline has a target: the baseline's own rule and the default
BASELINE_TARGETS = (StreamingLLM.name, DEFAULT_POLICY)

def plot(stream: StreamBench, path: str | os.PathLike) -> None:
    """Tokens/s and memory against stream length, one line per policy configuration, medians over repeats."""
    plt = pyplot("the benchmark's plot (--png)")

    has_gpu = any(g.gpu_mib is not None for r in stream.runs for g in r.segments)
    fig, axes = plt.subplots(3 if has_gpu else 2, 1, figsize=(9, 9 if has_gpu else 6.5), sharex=True)
    for runs in stream._by_config().values():
        segs = list(zip(*(r.segments for r in runs)))  # segment i of every repeat
        x = [group[0].tokens for group in segs]
        rates = np.median([tokens_per_s(r.segments) for r in runs], axis=0)
        style = {"label": runs[0].label, "marker": "o" if len(x) < 5 else None}  # a short run (full) stays visible
        axes[0].plot(x, rates, **style)
        panels = [(axes[1], "rss_mib")] + ([(axes[2], "gpu_mib")] if has_gpu else [])
        for ax, key in panels:
            ax.plot(x, [np.median([getattr(g, key) or np.nan for g in group]) for group in segs], **style)
    axes[0].set_ylabel("tokens/s (per segment)")
    axes[0].set_ylim(bottom=0)
    axes[1].set_ylabel("resident memory (MiB)")
    if has_gpu:
        axes[2].set_ylabel(f"GPU memory, {stream.gpu_memory_scope} (MiB)")
    axes[-1].set_xlabel("stream length (tokens)")
    axes[0].legend(fontsize=8)
    axes[0].set_title(f"{stream.model} on {stream.device}, chunk {stream.chunk}", fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
