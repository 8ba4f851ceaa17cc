"""Perplexity of a long text read through a bounded cache: every token scored given the cache.

`text_blocks` reads a .txt or .gz file in blocks (a multi-GB file never sits in memory),
`file_tokens` tokenizes it block by block, and `stream_perplexity` streams the tokens through one
`StreamSession`, recording a curve of perplexity, speed, cells and memory per segment. A run can
save its state every so many tokens and resume from it (`checkpoint=`), so that a run of
millions of tokens survives an interruption.
"""
from __future__ import annotations

import codecs
import gzip
import itertools
import os
import re
import time
import zlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .bench import rss_mib
from .policies import make_policy, options
from .session import StreamSession

BLOCK_BYTES = 1 << 20
SNIFF_BYTES = 1 << 16
LINE_START = re.compile(r"(?s:.*)\n(?=\S)")  # greedy: up to the last newline before a printable character


class TextFileError(ValueError):
    """The file cannot be read as text."""


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def check_text_file(path: str | os.PathLike) -> Path:
    """Raise TextFileError, saying why, unless `path` is a non-empty UTF-8 text file (or .gz of one)."""
    path = Path(path)
    if not path.is_file():
        raise TextFileError(f"{path}: no such file")
    try:
        with _open(path) as f:
            head = f.read(SNIFF_BYTES)
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise TextFileError(f"{path}: cannot be read ({exc})") from None
    if not head.strip():
        raise TextFileError(f"{path}: the file is empty (or only whitespace)")
    if b"\x00" in head:
        raise TextFileError(f"{path}: binary data, not text (NUL bytes in the first {len(head)} bytes)")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head)  # a character cut at the end is fine
    except UnicodeDecodeError as exc:
        raise TextFileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return path


def text_blocks(path: str | os.PathLike, block_bytes: int = BLOCK_BYTES) -> Iterator[str]:
    """The text of `path` in pieces of about `block_bytes`, each cut before the last line that starts
    with a printable character, so that tokenizing piece by piece gives the tokens of the whole."""
    path = check_text_file(path)
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry = ""
    with _open(path) as f:
        while True:
            try:
                raw = f.read(block_bytes)
                text = carry + decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as exc:
                raise TextFileError(f"{path}: not UTF-8 text past its start ({exc.reason})") from None
            except (OSError, EOFError, zlib.error) as exc:
                raise TextFileError(f"{path}: cannot be read past its start ({exc})") from None
            if not raw:
                break
            line_start = LINE_START.search(text)
            cut = line_start.end() if line_start else len(text)  # no line start in a whole block: cut anyway
            yield text[:cut]
            carry = text[cut:]
    if carry:
        yield carry


def file_tokens(session: StreamSession, path: str | os.PathLike) -> Iterator[list[int]]:
    """Token ids of the file, block by block (BOS before the first)."""
    for i, block in enumerate(text_blocks(path)):
        yield session.runtime.tokenize(block, add_special=i == 0)


def take(blocks: Iterable[Sequence[int]], start: int, stop: int | None) -> Iterator[Sequence[int]]:
    """The tokens [start, stop) of a stream given in blocks, still in blocks."""
    seen = 0
    for block in blocks:
        a, b = seen, seen + len(block)
        seen = b
        if b <= start:
            continue
        lo, hi = max(start - a, 0), len(block) if stop is None else min(stop - a, len(block))
        if hi > lo:
            yield block[lo:hi]
        if stop is not None and seen >= stop:
            return


@dataclass
class Segment:
    """One stretch of the stream (`tokens` is where it ends): its own perplexity and speed.

    `cpu_s` is this process's CPU time over the stretch: on a shared machine, tokens per CPU second
    show whether the work per token grows with the stream, whatever else the machine runs."""
    tokens: int
    ppl: float
    tokens_per_s: float
    cells: int
    rss_mb: float
    cpu_s: float = float("nan")


@dataclass
class PerplexityRun:
    policy: str
    budget: int
    chunk: int
    window: int | None
    bias: float | None
    recent: int | None
    sinks: int | None = None
    tokens: int = 0          # tokens scored (the first of the stream has no prediction)
    ppl: float = float("nan")
    tokens_per_s: float = 0.0
    peak_cells: int = 0
    peak_rss_mb: float = 0.0
    seconds: float = 0.0
    evict_share: float = 0.0    # of stream time: selecting, removing and re-indexing
    capture_share: float = 0.0  # of stream time: reading and aligning scores
    nll_sum: float = 0.0
    curve: list[Segment] = field(default_factory=list)

    def label(self) -> str:
        parts = [self.policy, f"budget {self.budget}"]
        parts += [f"{k} {v:g}" for k in ("bias", "window", "recent", "sinks") if (v := getattr(self, k)) is not None]
        return ", ".join(parts)

    def to_json(self) -> dict:
        out = asdict(self)
        del out["nll_sum"]
        return out

    @classmethod
    def from_json(cls, data: dict) -> "PerplexityRun":
        """The run from `to_json`'s record, or from a CLI record (which adds the model and file)."""
        names = {f.name for f in fields(cls)} - {"curve"}
        curve = [Segment(**s) for s in data["curve"]]
        return cls(**{k: v for k, v in data.items() if k in names}, curve=curve)


@dataclass(frozen=True)
class RunSpec:
    """One run of a comparison: a policy at a budget with its settings (None: the default)."""
    policy: str
    budget: int
    settings: tuple[tuple[str, float], ...] = ()

    @property
    def name(self) -> str:
        return "-".join([self.policy, f"b{self.budget}", *(f"{k}{v:g}" for k, v in self.settings)])


def run_grid(policies: Sequence[str], budgets: Sequence[int],
             sweeps: dict[str, Sequence[float]] | None = None) -> list[RunSpec]:
    """Every policy at every budget, crossed with the swept settings that the policy takes
    (streaming-llm takes no bias, so a bias sweep runs it once). Checked before any model is loaded,
    so a long sweep does not fail hours in: ValueError on an unknown policy, a budget or setting the
    policy cannot keep, or a run named twice."""
    if not policies or not budgets:
        raise ValueError("name at least one policy and one budget")
    specs = []
    for policy in policies:
        name = make_policy(policy, budget=max(budgets)).name  # the canonical name: 'H2O' runs as 'h2o'
        swept = {k: v for k, v in (sweeps or {}).items() if v and k in options(name)}
        for budget in budgets:
            for values in itertools.product(*swept.values()):
                settings = tuple(zip(swept, values))
                make_policy(name, budget=budget, **dict(settings))
                specs.append(RunSpec(name, budget, settings))
    if len(set(specs)) != len(specs):
        raise ValueError("a policy or budget is named twice")
    return specs


def stream_perplexity(source: str | os.PathLike | Sequence[int] | Iterable[Sequence[int]], *, model_path=None,
                      policy: str = "inf-mllm", budget: int = 512, chunk: int = 256, max_tokens: int | None = None,
                      segment: int = 1024, checkpoint: str | os.PathLike | None = None,
                      checkpoint_every: int = 50_000, progress: Callable[[PerplexityRun, int], None] | None = None,
                      n_gpu_layers: int = -1, n_threads: int | None = None, flash_attn: bool | None = None,
                      **settings) -> PerplexityRun:
    """Stream `source` (a text file, a list of token ids, or an iterable of blocks of them) chunk by
    chunk, scoring each token's NLL given the bounded cache; return the run with its per-`segment`
    curve.

    `full` holds at most the model's training context: its stream stops there. With `checkpoint`,
    the session and the run are saved there every `checkpoint_every` tokens and at the end; an
    existing checkpoint of the same run is resumed. `progress(run, tokens_done)` is called after
    every chunk.
    """
    if isinstance(source, (str, os.PathLike)):
        check_text_file(source)
    elif isinstance(source, np.ndarray) or (isinstance(source, Sequence) and
                                            (len(source) == 0 or isinstance(source[0], (int, np.integer)))):
        source = [source]  # one block
    session = StreamSession(model_path, policy=policy, budget=budget, chunk=chunk, n_gpu_layers=n_gpu_layers,
                            n_threads=n_threads, flash_attn=flash_attn, **settings)
    with session:
        cfg = session.policy.config()
        run = PerplexityRun(policy=session.policy.name, budget=budget, chunk=chunk, window=cfg.get("window"),
                            bias=cfg.get("bias"), recent=cfg.get("recent"), sinks=cfg.get("sinks"))
        if checkpoint is not None and Path(checkpoint).exists():
            saved = session.load(checkpoint)  # refuses a checkpoint of other settings
            run = PerplexityRun.from_json({**saved["run"], "nll_sum": saved["nll_sum"]})
        done = session.stats.tokens_seen  # tokens fed, the unscored first one included
        seg_nll, seg_n, seg_s, seg_cpu = saved["segment"] if session.stats.tokens_seen else (0.0, 0, 0.0, 0.0)
        if run.policy == "full":
            limit = session.runtime.n_ctx_train
            max_tokens = limit if max_tokens is None else min(max_tokens, limit)
        seg_t0, seg_cpu0 = time.perf_counter() - seg_s, time.process_time() - seg_cpu
        t_start = time.perf_counter() - run.seconds
        last_save = done

        def end_segment() -> None:
            nonlocal seg_nll, seg_n, seg_t0, seg_cpu0
            now, cpu = time.perf_counter(), time.process_time()
            rss = rss_mib() or float("nan")
            run.curve.append(Segment(run.tokens, float(np.exp(seg_nll / seg_n)), seg_n / (now - seg_t0),
                                     session.stats.cells_cached, rss, cpu - seg_cpu0))
            run.peak_rss_mb = max(run.peak_rss_mb, rss)
            seg_nll, seg_n, seg_t0, seg_cpu0 = 0.0, 0, now, cpu

        def save() -> None:
            segment_so_far = (seg_nll, seg_n, time.perf_counter() - seg_t0, time.process_time() - seg_cpu0)
            session.save(checkpoint, extra={"run": run.to_json(), "nll_sum": run.nll_sum, "segment": segment_so_far})

        blocks = file_tokens(session, source) if isinstance(source, (str, os.PathLike)) else source
        for block in take(blocks, done, max_tokens):
            for i in range(0, len(block), chunk):
                nll = session.token_nll(block[i:i + chunk])
                done += len(block[i:i + chunk])
                run.nll_sum += float(nll.sum())
                run.tokens += nll.size
                seg_nll += float(nll.sum())
                seg_n += nll.size
                run.peak_cells = session.stats.peak_cells  # the controller keeps the peak, across resumes too
                if seg_n >= segment:
                    end_segment()
                run.seconds = time.perf_counter() - t_start
                run.ppl = float(np.exp(run.nll_sum / max(run.tokens, 1)))
                if progress is not None:
                    progress(run, done)
                if checkpoint is not None and done - last_save >= checkpoint_every:
                    save()
                    last_save = done
        stats = session.stats
        run.seconds = time.perf_counter() - t_start
        run.tokens_per_s = run.tokens / run.seconds if run.seconds else 0.0
        run.peak_rss_mb = max(run.peak_rss_mb, rss_mib() or float("nan"))
        run.evict_share = stats.evict_s / run.seconds if run.seconds else 0.0
        run.capture_share = stats.capture_s / run.seconds if run.seconds else 0.0
        if checkpoint is not None:
            save()  # with the last segment still open, so that a longer run continues it
        if seg_n:
            end_segment()
        return run


CSV_FIELDS = ("policy", "budget", "chunk", "window", "bias", "recent", "sinks", "tokens", "ppl", "tokens_per_s",
              "peak_cells", "peak_rss_mb", "seconds", "evict_share", "capture_share")


def table(runs: Sequence[PerplexityRun]) -> str:
    """The runs as an aligned text table, best perplexity first within each budget."""
    head = f"{'policy':14s} {'budget':>6s} {'bias':>5s} {'window':>6s} {'recent':>6s} {'sinks':>5s} {'tokens':>9s} " \
           f"{'ppl':>8s} {'tok/s':>7s} {'peak cells':>10s} {'peak RSS MB':>11s}"
    lines = [head, "-" * len(head)]
    fmt = lambda v, width: f"{'-' if v is None else format(v, 'g'):>{width}}"  # noqa: E731
    for r in sorted(runs, key=lambda r: (r.budget, r.ppl)):
        lines.append(f"{r.policy:14s} {r.budget:6d} {fmt(r.bias, 5)} {fmt(r.window, 6)} {fmt(r.recent, 6)} {fmt(r.sinks, 5)} "
                     f"{r.tokens:9d} {r.ppl:8.3f} {r.tokens_per_s:7.1f} {r.peak_cells:10d} {r.peak_rss_mb:11.1f}")
    return "\n".join(lines)


def cumulative_ppl(run: PerplexityRun) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, perplexity of everything up to there) at each segment end of the run's curve."""
    ends = np.array([s.tokens for s in run.curve], dtype=np.float64)
    sizes = np.diff(np.concatenate(([0.0], ends)))
    nll = np.cumsum(sizes * np.log([s.ppl for s in run.curve]))
    return ends, np.exp(nll / np.maximum(ends, 1))


def plot_runs(runs: Sequence[PerplexityRun], path: str | os.PathLike, title: str = "") -> None:
    """Perplexity (so far) and resident memory against stream length, one line per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=(2, 1))
    for r in runs:
        if not r.curve:
            continue
        x, y = cumulative_ppl(r)
        line, = top.plot(x, y, label=f"{r.label()}: {r.ppl:.2f}")
        bottom.plot(x, [s.rss_mb for s in r.curve], color=line.get_color())
    top.set_ylabel("perplexity so far")
    top.set_title(title or "streaming perplexity")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    bottom.set_ylabel("resident memory (MB)")
    bottom.set_xlabel("tokens streamed")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
