"""Benchmarks that print figures; speed claims are shown here, never asserted in unit tests.

Two parts, measured in one process:

* capture overhead: prefill and decode tokens/s with score capture off vs on, interleaved;
* stream: each policy streams the same tokens through a `StreamSession`; per segment of the stream
  it records tokens/s, time spent evicting and re-indexing (`CacheStats.evict_s`) and reading
  scores (`capture_s`), resident memory (VmRSS) and, on CUDA, GPU memory. Runs are interleaved:
  repeat r starts at the r-th run of the list, so machine drift spreads over all of them.

`targets()` puts the figures against issue 6's targets.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .models import cache_dir
from .runtime import Runtime

FULL = "full"  # no eviction: streams until the model's training context is full


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


# -- the machine -------------------------------------------------------------------------------
def gpu_offload_supported() -> bool:
    from llama_cpp import llama_cpp as llama
    return bool(llama.llama_supports_gpu_offload())


def on_gpu(n_gpu_layers: int) -> bool:
    return n_gpu_layers != 0 and gpu_offload_supported()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def rss_mib() -> float | None:
    """Resident memory of this process now (VmRSS), in MiB; None where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class GpuMemory:
    """GPU memory through NVML (the library nvidia-smi reads): what this process holds, or, where
    a container hides its pid from the driver, what the whole device holds (`scope` says which).
    Reads GPU 0: the device machine has one."""

    def __init__(self):
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(self.handle)
        self.name = name.decode() if isinstance(name, bytes) else name
        self.scope = "process"

    def used_mib(self) -> float:
        for proc in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
            if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                self.scope = "process"
                return proc.usedGpuMemory / 2**20
        self.scope = "device"
        return self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used / 2**20

    @classmethod
    def open(cls, n_gpu_layers: int) -> "GpuMemory | None":
        """The probe on a CUDA run, None on the CPU or without nvidia-ml-py."""
        if not on_gpu(n_gpu_layers):
            return None
        try:
            return cls()
        except Exception:  # no pynvml, or no NVIDIA driver (another GPU backend)
            return None


def device_label(n_gpu_layers: int, n_threads: int | None) -> str:
    if on_gpu(n_gpu_layers):
        gpu = GpuMemory.open(n_gpu_layers)
        return f"GPU ({gpu.name if gpu else 'name unknown'})"
    return f"CPU ({cpu_name()}, {n_threads or os.cpu_count()} threads)"


# -- synthetic models --------------------------------------------------------------------------
def synthetic_model(shape: str, dtype: str = "q8_0", directory: str | os.PathLike | None = None) -> Path:
    """A random-weight model of a named shape (`synthetic.SHAPES`), written once into `directory`
    (default `<cache>/synthetic`) and reused: the same shape and dtype give the same bytes."""
    from .synthetic import SHAPES, write_model

    if shape not in SHAPES:
        raise ValueError(f"unknown synthetic shape {shape!r}: choose one of {', '.join(SHAPES)}")
    directory = Path(directory) if directory is not None else cache_dir() / "synthetic"
    path = directory / f"{shape}-{dtype}.gguf"
    if not path.exists():
        part = path.with_suffix(f".part{os.getpid()}")  # an interrupted write never looks complete
        write_model(part, shape, dtype=dtype)
        part.replace(path)
    return path


# -- capture overhead --------------------------------------------------------------------------
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
                     n_threads: int | None = None, seed: int = 0) -> CaptureOverhead:
    """Prefill `prompt_tokens` random tokens in chunks of `chunk`, then decode `decode_tokens` one by one,
    alternating capture off and on `repeats` times each (decode steps capture a window of 1)."""
    rng = np.random.default_rng(seed)
    n_ctx = -(-(prompt_tokens + decode_tokens) // 256) * 256
    with Runtime(model_path, n_ctx=n_ctx, n_batch=chunk, n_gpu_layers=n_gpu_layers, flash_attn=flash_attn,
                 n_threads=n_threads) as rt:
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
        return CaptureOverhead(rt.model_path.name, device_label(n_gpu_layers, n_threads), prompt_tokens, chunk,
                               decode_tokens, window, **{k: Rate.of(v) for k, v in results.items()})


# -- streaming ---------------------------------------------------------------------------------
def stream_runs(policies: Sequence[str], budgets: Sequence[int]) -> list[tuple[str, int | None]]:
    """The (policy, budget) pairs of a stream benchmark, checked as `perplexity.run_grid` checks them.
    `full` runs once, budget None: it keeps every token, up to the model's training context."""
    from .perplexity import run_grid

    pairs = [(s.policy, None if s.policy == FULL else s.budget) for s in run_grid(policies, budgets)]
    return list(dict.fromkeys(pairs))


def stream_tokens(rt: Runtime, n: int, source: str, seed: int = 0) -> np.ndarray:
    """`n` token ids: Shakespeare's plays, repeated if the stream is longer, or random ids (not the
    3 special tokens of the synthetic models' tokenizer)."""
    if source == "random":
        return np.random.default_rng(seed).integers(3, rt.n_vocab, n, dtype=np.int32)
    if source != "shakespeare":
        raise ValueError(f"unknown token source {source!r}: 'shakespeare' or 'random'")
    from .data import shakespeare_path

    text = shakespeare_path().read_text(encoding="utf-8")
    ids = np.array(rt.tokenize(text[: 8 * n + 1024]), dtype=np.int32)  # tokens are ~4 characters
    return np.resize(ids, n)


@dataclass
class Segment:
    tokens: int          # stream length at the end of the segment
    seconds: float       # feeding the segment (decode, capture, eviction)
    evict_s: float       # of which selecting, removing and re-indexing cells
    capture_s: float     # of which reading and aligning attention scores
    cells: int           # cells cached at the end
    rss_mib: float | None
    gpu_mib: float | None


@dataclass
class StreamRun:
    policy: str
    budget: int               # the policy's budget; for full, the context it was given
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
    """One (policy, budget) over the repeats: medians with min and max."""
    policy: str
    budget: int
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

    @classmethod
    def of(cls, runs: Sequence[StreamRun]) -> "StreamSummary":
        r0 = runs[0]
        first_last = [r.first_last() for r in runs]
        rss = [(r.peak("rss_mib", True), r.peak("rss_mib")) for r in runs]
        gpu = [(r.peak("gpu_mib", True), r.peak("gpu_mib")) for r in runs]
        return cls(
            r0.policy, r0.budget, r0.tokens, r0.stopped_at,
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

    def summaries(self) -> list[StreamSummary]:
        keys = list(dict.fromkeys((r.policy, r.budget) for r in self.runs))
        return [StreamSummary.of([r for r in self.runs if (r.policy, r.budget) == k]) for k in keys]

    def speedups(self) -> list[dict]:
        """inf-mllm over h2o at each budget, paired within a repeat (drift cancels)."""
        out = []
        for budget in dict.fromkeys(r.budget for r in self.runs if r.policy == "h2o"):
            pairs = [(a.tokens_per_s, b.tokens_per_s) for a in self.runs for b in self.runs
                     if a.policy == "inf-mllm" and b.policy == "h2o" and a.budget == b.budget == budget
                     and a.repeat == b.repeat]
            if pairs:
                out.append({"budget": budget, "inf_mllm_over_h2o": Rate.of([a / b for a, b in pairs])})
        return out

    def table(self) -> str:
        head = (f"stream: {self.model} on {self.device}; {self.tokens} tokens ({self.source}) in chunks of "
                f"{self.chunk}, segments of {self.segment}, {self.repeats} repeats, medians [min, max]"
                + ("" if self.reindex else "; positions NOT re-indexed"))
        rows = [head, f"{'policy':14s} {'budget':>6s} {'tokens':>8s} {'tok/s':>24s} {'last/first 10%':>22s} "
                      f"{'evict ms/1k':>10s} {'evict %':>8s} {'capture %':>9s} {'RSS MiB 10%->peak':>18s}"]
        for s in self.summaries():
            rss = (f"{s.rss_first10_mib.median:.0f} -> {s.rss_peak_mib.median:.0f}" if s.rss_peak_mib else "-")
            rows.append(f"{s.policy:14s} {s.budget:6d} {s.tokens:8d} {str(s.tokens_per_s):>24s} "
                        f"{str(s.last_vs_first):>22s} {s.evict_ms_per_1k.median:10.2f} "
                        f"{s.evict_share.median:8.2%} {s.capture_share.median:9.2%} {rss:>18s}")
            if s.stopped_at is not None:
                rows.append(f"{'':14s} full stopped at {s.stopped_at} tokens: the training context is full")
            if s.gpu_peak_mib:
                rows.append(f"{'':14s} GPU MiB ({self.gpu_memory_scope}) {s.gpu_first10_mib.median:.0f} "
                            f"-> {s.gpu_peak_mib.median:.0f}")
        for sp in self.speedups():
            rows.append(f"inf-mllm / h2o at budget {sp['budget']}: {sp['inf_mllm_over_h2o']}x")
        return "\n".join(rows)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "runs"} | {
            "summary": [asdict(s) for s in self.summaries()],
            "speedups": [sp | {"inf_mllm_over_h2o": asdict(sp["inf_mllm_over_h2o"])} for sp in self.speedups()],
            "runs": [asdict(r) for r in self.runs],
        }


def stream_bench(model_path=None, *, runs: Sequence[tuple[str, int | None]], tokens: int = 20000,
                 chunk: int = 256, segment: int = 1024, repeats: int = 3, source: str = "shakespeare",
                 reindex: bool = True, n_gpu_layers: int = -1, flash_attn: bool | None = None,
                 n_threads: int | None = None, progress: bool = False) -> StreamBench:
    """Stream `tokens` tokens through each (policy, budget) of `runs` (see `stream_runs`), `repeats` times,
    interleaved. `segment` is rounded up to whole chunks and `tokens` to whole segments, so that every
    segment measures the same work. `reindex=False` keeps the original positions
    (no `seq_add`, no key re-rotation): a speed reference for what re-indexing costs.
    `progress` shows a bar on stderr."""
    from tqdm import tqdm

    from .session import StreamSession

    segment = -(-segment // chunk) * chunk
    tokens = -(-tokens // segment) * segment
    with Runtime(model_path, n_ctx=256, n_gpu_layers=0) as probe:
        model_name, n_ctx_train = probe.model_path.name, probe.n_ctx_train
        ids = stream_tokens(probe, tokens, source)
    gpu = GpuMemory.open(n_gpu_layers)
    full_budget = min(tokens, n_ctx_train // chunk * chunk)  # the context full may fill
    planned = repeats * sum(full_budget if policy == FULL else tokens for policy, _ in runs)
    # a log (not a terminal) gets a line every 30 s, so a long run shows how far it is
    bar = tqdm(total=planned, unit="tok", unit_scale=True, disable=not progress, leave=False,
               mininterval=0.5 if sys.stderr.isatty() else 30)

    def one(policy: str, budget: int | None, repeat: int) -> StreamRun:
        budget = full_budget if budget is None else budget
        n = min(tokens, budget) if policy == FULL else tokens
        with StreamSession(model_path, budget=budget, policy=policy, chunk=chunk, n_gpu_layers=n_gpu_layers,
                           flash_attn=flash_attn, n_threads=n_threads) as s:
            # off: the controller's own path for models that cannot shift (positions keep growing)
            s.cache.reindex = s.cache.reindex and reindex
            s.feed_tokens(ids[:chunk].tolist())  # warm-up: compute buffers, weight repacking, kernels
            s.reset()
            rss_start = rss_mib()
            segments: list[Segment] = []
            for a in range(0, n, segment):
                before = s.stats
                ev, cap = before.evict_s, before.capture_s
                t0 = time.perf_counter()
                s.feed_tokens(ids[a:min(a + segment, n)].tolist())
                s.runtime.logits()  # waits for the device
                dt = time.perf_counter() - t0
                st = s.stats
                segments.append(Segment(st.tokens_seen, dt, st.evict_s - ev, st.capture_s - cap, st.cells_cached,
                                        rss_mib(), gpu.used_mib() if gpu else None))
                bar.set_description(f"{policy} {budget} #{repeat}", refresh=False)
                bar.update(st.tokens_seen - a)
            st = s.stats
            return StreamRun(policy, budget, repeat, n, n if n < tokens else None,
                             sum(g.seconds for g in segments), st.decode_s, st.evict_s, st.capture_s,
                             st.peak_cells, st.cells_evicted, rss_start, segments)

    results = []
    with bar:
        for r in range(repeats):
            order = list(runs[r % len(runs):]) + list(runs[:r % len(runs)])
            results.extend(one(policy, budget, r) for policy, budget in order)
    return StreamBench(model_name, device_label(n_gpu_layers, n_threads), source, tokens, chunk, segment, repeats,
                       reindex, gpu.scope if gpu else None, results)


# -- figures -----------------------------------------------------------------------------------
def plot(stream: StreamBench, path: str | os.PathLike) -> None:
    """Tokens/s and memory against stream length, one line per (policy, budget), medians over repeats."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_gpu = any(g.gpu_mib is not None for r in stream.runs for g in r.segments)
    fig, axes = plt.subplots(3 if has_gpu else 2, 1, figsize=(9, 9 if has_gpu else 6.5), sharex=True)
    keys = list(dict.fromkeys((r.policy, r.budget) for r in stream.runs))
    for policy, budget in keys:
        runs = [r for r in stream.runs if (r.policy, r.budget) == (policy, budget)]
        segs = list(zip(*(r.segments for r in runs)))  # segment i of every repeat
        x = [group[0].tokens for group in segs]
        lengths = np.diff([0] + x)
        style = {"label": f"{policy} ({'context' if policy == FULL else 'budget'} {budget})",
                 "marker": "o" if len(x) < 5 else None}  # a short run (full) stays visible
        axes[0].plot(x, lengths / np.array([np.median([g.seconds for g in group]) for group in segs]), **style)
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


def targets(capture: CaptureOverhead | None, stream: StreamBench | None) -> list[dict]:
    """Issue 6's targets against the measured medians: {"target", "policy", "budget", "value", "op",
    "limit", "met"}."""
    out = []

    def add(target: str, value: float | None, op: str, limit: float, policy=None, budget=None) -> None:
        if value is None or math.isnan(value):
            return
        met = value <= limit if op == "<=" else value >= limit
        out.append({"target": target, "policy": policy, "budget": budget, "value": value, "op": op,
                    "limit": limit, "met": bool(met)})

    if capture is not None:
        add("capture overhead, prefill", capture.overhead("prefill"), "<=", 0.03)
        add("capture overhead, decode", capture.overhead("decode"), "<=", 0.03)
    if stream is not None:
        for s in stream.summaries():
            if s.policy == FULL:
                continue
            add("eviction + re-indexing share of stream time", s.evict_share.median, "<=", 0.05, s.policy, s.budget)
            add("tokens/s, last 10% of the stream / first 10%", s.last_vs_first.median, ">=", 0.95,
                s.policy, s.budget)
            add("peak RSS growth after the first 10%", s.rss_growth.median if s.rss_growth else None, "<=", 0.05,
                s.policy, s.budget)
        for sp in stream.speedups():
            add("inf-mllm / h2o tokens/s", sp["inf_mllm_over_h2o"].median, ">=", 2.0, "inf-mllm", sp["budget"])
    return out


def targets_table(rows: list[dict]) -> str:
    lines = ["targets (medians):"]
    for t in rows:
        who = f" {t['policy']} budget {t['budget']}" if t["policy"] else ""
        lines.append(f"  {'met ' if t['met'] else 'MISS'} {t['target']}{who}: {t['value']:.4g} "
                     f"(target {t['op']} {t['limit']:g})")
    return "\n".join(lines)
