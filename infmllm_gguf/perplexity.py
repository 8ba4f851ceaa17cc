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
import math
import os
import re
import time
import zlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .extras import pyplot
from .policies import declared_options, from_config
from .probes import rss_mib
from .runtime import Model
from .segments import Segment, SegmentClock
from .memory import memory_label
from .session import SessionConfig, StreamSession

NO_MEMORY = SessionConfig(memory=False)  # the runs' default: a stream without prompts needs none

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


def file_tokens(model: Model, path: str | os.PathLike) -> Iterator[list[int]]:
    """Token ids of the file, block by block (BOS before the first)."""
    for i, block in enumerate(text_blocks(path)):
        yield model.tokenize(block, add_special=i == 0)


def slice_tokens(blocks: Iterable[Sequence[int]], start: int, stop: int | None) -> Iterator[Sequence[int]]:
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


class PolicyRun:
    """What the records of a run of one policy share (`policy`: its config; the KV cache types)."""
    policy: dict
    cache_type_k: str
    cache_type_v: str

    @property
    def name(self) -> str:
        return self.policy["name"]

    @property
    def budget(self) -> int:
        return self.policy["budget"]

    def label(self) -> str:
        kv = ("f16", "f16") != (self.cache_type_k, self.cache_type_v)
        return from_config(self.policy).label() + (f", KV {self.cache_type_k}/{self.cache_type_v}" if kv else "")


@dataclass
class PerplexityRun(PolicyRun):
    policy: dict               # Policy.config(): the name and every option
    chunk: int
    cache_type_k: str = "f16"  # the KV cache's element types (records before them: f16)
    cache_type_v: str = "f16"
    tokens: int = 0            # tokens scored (the first of the stream has no prediction)
    ppl: float = float("nan")
    tokens_per_s: float = 0.0
    peak_cells: int = 0
    peak_rss_mib: float = 0.0
    seconds: float = 0.0
    evict_share: float = 0.0    # of stream time: selecting, removing and re-indexing
    capture_share: float = 0.0  # of stream time: reading and aligning scores
    stopped_at: int | None = None  # full: the stream was cut here, where its cache was full
    memory: dict | None = None     # MemoryConfig.config() of a memory that recorded the stream, else None
    nll_sum: float = 0.0
    curve: list[Segment] = field(default_factory=list)

    def label(self) -> str:
        return super().label() + memory_label(self.memory)

    def stop_note(self) -> str | None:
        """Why the stream was cut short, if it was."""
        if self.stopped_at is None:
            return None
        why = f"its budget of {self.budget} cells" if self.stopped_at == self.budget else "the model's training context"
        return f"{self.name} stopped at {self.stopped_at} tokens: {why} is full"

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


def stream_perplexity(source: str | os.PathLike | Sequence[int] | Iterable[Sequence[int]], *,
                      model: Model | str | os.PathLike | None = None, config: SessionConfig = NO_MEMORY,
                      max_tokens: int | None = None, segment: int = 1024,
                      checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 50_000,
                      progress: Callable[[PerplexityRun, int], None] | None = None) -> PerplexityRun:
    """Stream `source` (a text file, a list of token ids, or an iterable of blocks of them) chunk by
    chunk, scoring each token's NLL given the bounded cache of a session made as `config` says;
    return the run with its per-`segment` curve.

    `full` holds at most its budget and the model's training context: its stream stops there
    (`stopped_at`). With `checkpoint`, the session and the run are saved there every
    `checkpoint_every` tokens and at the end; an existing checkpoint of the same run is resumed.
    `progress(run, tokens_done)` is called after every chunk. A memory (`config.memory`, off by
    default) re-reads only at prompts, which a perplexity stream has none of: the scores are the
    same with it, its recording's cost shows in tokens/s.
    """
    if isinstance(source, (str, os.PathLike)):
        check_text_file(source)
    elif isinstance(source, np.ndarray) or (isinstance(source, Sequence) and
                                            (len(source) == 0 or isinstance(source[0], (int, np.integer)))):
        source = [source]  # one block
    chunk = config.chunk
    with StreamSession.from_config(model, config) as session:
        run = PerplexityRun(policy=session.policy.config(), chunk=chunk, cache_type_k=config.cache_type_k,
                            cache_type_v=config.cache_type_v,
                            memory=None if session.memory is None else session.memory.config.config())
        clock = SegmentClock(lambda: session.stats)
        seg_nll, seg_n = 0.0, 0
        if checkpoint is not None and Path(checkpoint).exists():
            saved = session.load(checkpoint)  # refuses a checkpoint of other settings
            run = PerplexityRun.from_json({**saved["run"], "nll_sum": saved["nll_sum"]})
            seg_nll, seg_n, elapsed = saved["segment"]
            clock.restart(elapsed)
        done = session.stats.tokens_seen  # tokens fed, the unscored first one included
        full_limit = None
        if not session.policy.evicts:
            full_limit = min(session.policy.budget, session.model.n_ctx_train)
        limit = full_limit if max_tokens is None else min(max_tokens, full_limit or max_tokens)
        t_start = time.perf_counter() - run.seconds
        last_save = done

        def end_segment() -> None:
            nonlocal seg_nll, seg_n
            run.curve.append(clock.end(run.tokens, ppl=float(np.exp(seg_nll / seg_n))))
            run.peak_rss_mib = max(run.peak_rss_mib, run.curve[-1].rss_mib or math.nan)
            seg_nll, seg_n = 0.0, 0

        def save() -> None:
            session.save(checkpoint, extra={"run": run.to_json(), "nll_sum": run.nll_sum,
                                            "segment": (seg_nll, seg_n, clock.elapsed())})

        blocks = file_tokens(session.model, source) if isinstance(source, (str, os.PathLike)) else source
        # one token past the limit says whether the stream was cut there
        for block in slice_tokens(blocks, done, None if limit is None else limit + 1):
            if limit is not None and done + len(block) > limit:
                block = block[:limit - done]
                run.stopped_at = limit if limit == full_limit else None
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
        run.peak_rss_mib = max(run.peak_rss_mib, rss_mib() or math.nan)
        run.evict_share = stats.evict_s / run.seconds if run.seconds else 0.0
        run.capture_share = stats.capture_s / run.seconds if run.seconds else 0.0
        if checkpoint is not None:
            save()  # with the last segment still open, so that a longer run continues it
        if seg_n:
            end_segment()
        return run


def csv_fields() -> tuple[str, ...]:
    """The columns of a run's CSV row: the policy's name, every option of any policy, the figures."""
    return ("policy", *declared_options(), "chunk", "tokens", "ppl", "tokens_per_s", "peak_cells", "peak_rss_mib",
            "seconds", "evict_share", "capture_share", "stopped_at")


def csv_row(run: PerplexityRun) -> dict:
    record = run.to_json()
    return {**record["policy"], **record, "policy": run.name}


def table(runs: Sequence[PerplexityRun]) -> str:
    """The runs as an aligned text table, best perplexity first within each budget."""
    width = max([len("policy")] + [len(r.label()) for r in runs])
    head = f"{'policy':{width}s} {'tokens':>9s} {'ppl':>8s} {'tok/s':>7s} {'peak cells':>10s} {'peak RSS MiB':>12s}"
    lines = [head, "-" * len(head)]
    for r in sorted(runs, key=lambda r: (r.budget, r.ppl)):
        lines.append(f"{r.label():{width}s} {r.tokens:9d} {r.ppl:8.3f} {r.tokens_per_s:7.1f} {r.peak_cells:10d} "
                     f"{r.peak_rss_mib:12.1f}")
        if r.stop_note():
            lines.append(f"{'':{width}s} {r.stop_note()}")
    return "\n".join(lines)


def cumulative_ppl(run: PerplexityRun) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, perplexity of everything up to there) at each segment end of the run's curve."""
    ends = np.array([s.tokens for s in run.curve], dtype=np.float64)
    sizes = np.diff(np.concatenate(([0.0], ends)))
    nll = np.cumsum(sizes * np.log([s.ppl for s in run.curve]))
    return ends, np.exp(nll / np.maximum(ends, 1))


def plot_runs(runs: Sequence[PerplexityRun], path: str | os.PathLike, title: str = "") -> None:
    """Perplexity (so far) and resident memory against stream length, one line per run."""
    plt = pyplot("a perplexity plot (--png)")

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=(2, 1))
    for r in runs:
        if not r.curve:
            continue
        x, y = cumulative_ppl(r)
        line, = top.plot(x, y, label=f"{r.label()}: {r.ppl:.2f}")
        bottom.plot(x, [s.rss_mib for s in r.curve], color=line.get_color())
    top.set_ylabel("perplexity so far")
    top.set_title(title or "streaming perplexity")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    bottom.set_ylabel("resident memory (MiB)")
    bottom.set_xlabel("tokens streamed")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
