"""Benchmarks that print figures; speed claims are shown here, never asserted in unit tests.

Four parts, each measured in one process:

* capture overhead: prefill and decode tokens/s with score capture off vs on, interleaved; decode
  captures the steps that generation captures (the last `window` of every `generation_headroom`),
  and, for comparison, every step;
* stream: each policy streams the same tokens through a `StreamSession`, beside the plain
  llama.cpp baseline (`runtime.plain`: StreamingLLM in llama-cpp-python alone); per segment of the
  stream it records tokens/s, time spent evicting and re-indexing (`CacheStats.evict_s`) and
  reading scores (`capture_s`), resident memory (VmRSS) and, on CUDA, GPU memory. Runs are
  interleaved: repeat r starts at the r-th run of the list, so machine drift spreads over all of
  them; each policy's tokens/s over the baseline's is paired within a repeat;
* kv: per KV cache type, bytes per cell, the attention scores against those of an f16 cache, and
  the default policy's perplexity at a budget;
* rpc: a stream with the layers on two local rpc-servers behind byte-counting relays: bytes over
  the network per token, and tokens/s against the same stream on this process alone.

`figures()` names the measured values that the command holds against its targets.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from .policies import DEFAULT_POLICY, Full, Policy, StreamingLLM, from_config, make_policy
from .probes import GpuMemory, device_label, rss_mib
from .runtime import Model, Runtime
from .runtime.plain import PLAIN, PlainStream
from .segments import Segment, SegmentClock, tokens_per_s
from .session import StreamSession


@dataclass(frozen=True)
class Rate:
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values) -> "Rate":
        return cls(float(np.median(values)), float(np.min(values)), float(np.max(values)))

    def __str__(self) -> str:
        return f"{self.median:.4g} [{self.min:.4g}, {self.max:.4g}]"


# -- capture overhead --------------------------------------------------------------------------
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


# -- streaming ---------------------------------------------------------------------------------
def stream_tokens(model: Model, n: int, source: str, seed: int = 0) -> np.ndarray:
    """`n` token ids: Shakespeare's plays, repeated if the stream is longer, or random ids (not the
    3 special tokens of the synthetic models' tokenizer)."""
    if source == "random":
        return np.random.default_rng(seed).integers(3, model.n_vocab, n, dtype=np.int32)
    if source != "shakespeare":
        raise ValueError(f"unknown token source {source!r}: 'shakespeare' or 'random'")
    from .data import shakespeare_path

    text = shakespeare_path().read_text(encoding="utf-8")
    token_ids = np.array(model.tokenize(text[: 8 * n + 1024]), dtype=np.int32)  # tokens are ~4 characters
    return np.resize(token_ids, n)


@dataclass(frozen=True)
class PlainBaseline:
    """The baseline run beside the policies: `runtime.plain.PlainStream` at a budget, keeping the
    first `sinks` tokens as `streaming-llm` does."""
    budget: int
    sinks: int = StreamingLLM.sinks

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
    budgets = dict.fromkeys(p.budget for p in policies if not isinstance(p, Full))
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
    out = [dataclasses.replace(p, budget=context) if isinstance(p, Full) else p for p in policies]
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
        planned = repeats * sum(full_budget if isinstance(p, Full) else tokens for p in policies)
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
            s = StreamSession(loaded, policy, chunk=chunk, flash_attn=flash_attn, n_threads=n_threads, **kv)
            s.cache.reindex = s.cache.reindex and reindex
            return s, s.feed_tokens, s.runtime.logits

        def stream_one(policy: Policy | PlainBaseline, repeat: int) -> StreamRun:
            n = min(tokens, policy.budget) if isinstance(policy, Full) else tokens
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


# -- figures -----------------------------------------------------------------------------------
#: the policies whose throughput over the plain baseline has a target: the baseline's own rule and the default
BASELINE_TARGETS = (StreamingLLM.name, DEFAULT_POLICY)

def plot(stream: StreamBench, path: str | os.PathLike) -> None:
    """Tokens/s and memory against stream length, one line per policy configuration, medians over repeats."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


# -- KV cache types ----------------------------------------------------------------------------
@dataclass(frozen=True)
class KvCacheType:
    """One KV cache type against f16: its size, its attention scores, the default policy's perplexity."""
    cache_type_k: str
    cache_type_v: str
    bytes_per_cell: float     # llama.cpp's saved state per cell: K and V rows of every layer, and metadata
    score_pearson: float      # scores of the same queries vs an f16 cache's, every layer and cell
    score_max_abs_diff: float
    top_overlap: float        # share of the f16 cache's top cells (layer mean) among this cache's top cells
    ppl: float                # the default policy at the budget over the stream
    ppl_vs_f16: float         # ppl / f16's ppl - 1
    tokens_per_s: float

    @property
    def label(self) -> str:
        return f"K {self.cache_type_k}, V {self.cache_type_v}"


@dataclass(frozen=True)
class KvCacheBench:
    model: str
    device: str
    policy: dict
    tokens: int
    chunk: int
    score_tokens: int          # context the score comparison decoded
    top_cells: int
    flash_attn: bool | None
    types: list[KvCacheType]

    def table(self) -> str:
        rows = [f"kv cache types: {self.model} on {self.device}; scores of the window of the last chunk of "
                f"{self.score_tokens} tokens vs f16's (top {self.top_cells} cells); {run_label(self.policy)} over "
                f"{self.tokens} tokens",
                f"{'cache':22s} {'bytes/cell':>10s} {'pearson':>8s} {'max |diff|':>10s} {'top overlap':>11s} "
                f"{'ppl':>8s} {'vs f16':>7s} {'tok/s':>7s}"]
        for t in self.types:
            rows.append(f"{t.label:22s} {t.bytes_per_cell:10.0f} {t.score_pearson:8.5f} {t.score_max_abs_diff:10.4f} "
                        f"{t.top_overlap:11.1%} {t.ppl:8.3f} {t.ppl_vs_f16:+7.2%} {t.tokens_per_s:7.1f}")
        return "\n".join(rows)

    def to_json(self) -> dict:
        return asdict(self)


def parse_cache_types(text: Sequence[str]) -> list[tuple[str, str]]:
    """Cache types as `K` (K and V alike) or `K/V`."""
    return [tuple(t.split("/", 1)) if "/" in t else (t, t) for t in text]


def kv_cache_bench(model=None, *, types: Sequence[tuple[str, str]] = (("f16", "f16"), ("q8_0", "q8_0"),
                                                                        ("q4_0", "q4_0")),
                   budget: int = 1024, tokens: int = 20000, chunk: int = 256, score_tokens: int = 1024,
                   top_cells: int = 64, flash_attn: bool | None = True, n_gpu_layers: int = -1,
                   n_threads: int | None = None, rpc: Sequence[str] = (), progress: bool = False) -> KvCacheBench:
    """For each (K type, V type) of `types`: bytes per cell, the attention that the last `window`
    queries of a chunk give after `score_tokens` Shakespeare tokens compared with an f16 cache's,
    and the default policy's perplexity at `budget` over `tokens` tokens of Shakespeare (eviction
    and re-indexing on the quantized cache). Flash attention is on by default: llama.cpp needs it
    for a quantized V."""
    from .perplexity import stream_perplexity

    types = [("f16", "f16")] + [t for t in types if t != ("f16", "f16")]
    policy = make_policy(DEFAULT_POLICY, budget=budget)
    with Model(model, n_gpu_layers=n_gpu_layers, rpc=rpc) as loaded:
        ids = stream_tokens(loaded, max(tokens, score_tokens), "shakespeare")
        measured = []
        for k, v in types:
            with Runtime(loaded, n_ctx=score_tokens + chunk, n_batch=chunk, flash_attn=flash_attn,
                         n_threads=n_threads, cache_type_k=k, cache_type_v=v) as rt:
                sizes = []
                for i in range(0, score_tokens, chunk):
                    if i + chunk >= score_tokens:
                        rt.capture_scores(policy.capture_queries(chunk))
                    rt.decode(ids[i:i + chunk].tolist(), range(i, min(i + chunk, score_tokens)))
                    sizes.append((min(i + chunk, score_tokens), rt.sequence_bytes()))
                scores = rt.read_scores().scores.astype(np.float64)
                (n0, b0), (n1, b1) = sizes[0], sizes[-1]
            run = stream_perplexity(ids[:tokens], model=loaded, policy=policy, chunk=chunk, flash_attn=flash_attn,
                                    n_threads=n_threads, cache_type_k=k, cache_type_v=v)
            measured.append(((k, v), (b1 - b0) / max(n1 - n0, 1), scores, run))
            if progress:
                print(f"kv {k}/{v}: ppl {run.ppl:.3f}", file=sys.stderr)
        ref_scores, ref_ppl = measured[0][2], measured[0][3].ppl
        top = lambda s: set(np.argsort(-s.mean(axis=0))[:top_cells].tolist())  # noqa: E731
        out = [KvCacheType(k, v, per_cell, float(np.corrcoef(ref_scores.ravel(), scores.ravel())[0, 1]),
                           float(np.abs(scores - ref_scores).max()), len(top(scores) & top(ref_scores)) / top_cells,
                           run.ppl, run.ppl / ref_ppl - 1.0, run.tokens_per_s)
               for (k, v), per_cell, scores, run in measured]
        return KvCacheBench(loaded.name, device_label(n_gpu_layers, n_threads), policy.config(), tokens, chunk,
                            score_tokens, top_cells, flash_attn, out)


# -- RPC -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RpcBench:
    """A stream with the model's layers on local rpc-servers, through byte-counting relays."""
    model: str
    servers: int
    server_threads: int
    policy: dict
    tokens: int
    chunk: int
    repeats: int
    load_bytes_sent: int           # the weights, sent once when the model loads
    bytes_sent_per_token: Rate     # client to servers while streaming
    bytes_received_per_token: Rate
    local_tokens_per_s: Rate       # the same stream, the same process, no servers
    rpc_tokens_per_s: Rate
    max_abs_logit_diff: float      # last logits, rpc vs local

    def table(self) -> str:
        return "\n".join([
            f"rpc: {self.model}, layers on {self.servers} local rpc-servers ({self.server_threads} thread each), "
            f"{run_label(self.policy)}, {self.tokens} tokens in chunks of {self.chunk}, {self.repeats} repeats",
            f"  weights sent at load: {self.load_bytes_sent / 2**20:.1f} MiB",
            f"  per token streamed: sent {self.bytes_sent_per_token} bytes, received "
            f"{self.bytes_received_per_token} bytes (x {self.chunk} per chunk)",
            f"  tokens/s: local {self.local_tokens_per_s}, rpc {self.rpc_tokens_per_s}",
            f"  last logits, rpc vs local: max |diff| {self.max_abs_logit_diff:.3g}"])

    def to_json(self) -> dict:
        return asdict(self)


def rpc_bench(model=None, *, servers: int = 2, server_threads: int = 1, tokens: int = 2048, chunk: int = 256,
              repeats: int = 3, policy: Policy | None = None, n_threads: int | None = None) -> RpcBench:
    """Stream `tokens` Shakespeare tokens with `policy` (default: the default policy at budget 512)
    with the layers on `servers` rpc-servers started here, each behind a `CountingRelay`, and the
    same stream locally, alternately `repeats` times; bytes each way per streamed token."""
    from .rpc import RpcServers

    policy = policy or make_policy(DEFAULT_POLICY, budget=512)
    with RpcServers(servers, threads=server_threads, count=True) as rs, Model(model) as local:
        ids = stream_tokens(local, tokens, "shakespeare").tolist()
        with Model(model, rpc=rs.endpoints) as remote:
            load_sent = sum(r.counts()[0] for r in rs.relays)
            rates: dict[str, list[float]] = {"local": [], "rpc": [], "sent": [], "received": []}
            logits = {}
            for _ in range(repeats):
                for where, m in (("local", local), ("rpc", remote)):
                    with StreamSession(m, policy, chunk=chunk, n_threads=n_threads) as s:
                        before = np.sum([r.counts() for r in rs.relays], axis=0)
                        t0 = time.perf_counter()
                        s.feed_tokens(ids)
                        logits[where] = s.runtime.logits()
                        rates[where].append(tokens / (time.perf_counter() - t0))
                        if where == "rpc":
                            sent, received = np.sum([r.counts() for r in rs.relays], axis=0) - before
                            rates["sent"].append(sent / tokens)
                            rates["received"].append(received / tokens)
            name = local.name
    return RpcBench(name, servers, server_threads, policy.config(), tokens, chunk, repeats, int(load_sent),
                    Rate.of(rates["sent"]), Rate.of(rates["received"]), Rate.of(rates["local"]), Rate.of(rates["rpc"]),
                    float(np.abs(logits["rpc"] - logits["local"]).max()))
