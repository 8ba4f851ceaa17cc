"""Where the needles go: one stream, many trials.

A stream of filler text ends in `trials` snapshot points, `spacing` tokens apart. For each
snapshot and each asked distance d, one needle starts d tokens before it (a little more where
another needle or a snapshot point is in the way), so every (distance, snapshot) pair is one
trial, asked from the exact state of the stream at that snapshot. The needle kinds rotate over
the snapshots, so each distance is asked about every kind. The first snapshot comes right after
the farthest needle: the stream is `max(distances) + trials * spacing` tokens and a few more
(more where a needle's extra sentence, an update's older value, lies farther back).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from .needles import KINDS, VERBATIM_KINDS, Needle, NeedleMaker


@dataclass(frozen=True)
class PlacedNeedle:
    start: int                # stream index of its first token
    tokens: tuple[int, ...]   # its statement's tokens, as in the stream
    needle: Needle
    extras: tuple[tuple[int, tuple[int, ...]], ...] = ()  # (start, tokens) of each of `needle.extras`

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


@dataclass(frozen=True)
class Question:
    snapshot: int    # index into `RecallPlan.snapshots`
    needle: int      # index into `RecallPlan.needles`
    target: int      # the distance asked for (one of `RecallPlan.distances`)
    distance: int    # the real one: snapshot stream index - needle start (>= target, within its jitter)


@dataclass
class RecallPlan:
    tokens: np.ndarray            # the whole stream, int32
    needles: list[PlacedNeedle]
    snapshots: list[int]          # stream indices: the stream up to there is fed before its questions
    questions: list[Question]
    distances: tuple[int, ...]
    config: dict                  # what the plan was made from (seed, trials, spacing, kinds, filler)

    def questions_at(self, snapshot: int) -> list[Question]:
        return [q for q in self.questions if q.snapshot == snapshot]

    def __len__(self) -> int:
        return int(self.tokens.size)


def log_distances(lo: int, hi: int) -> tuple[int, ...]:
    """Distances from `lo` doubling up to `hi` (and `hi` itself)."""
    if lo < 1 or hi < lo:
        raise ValueError(f"need 1 <= lo <= hi (got {lo}, {hi})")
    out = [lo]
    while out[-1] * 2 < hi:
        out.append(out[-1] * 2)
    return tuple(out + [hi] if out[-1] != hi else out)


class Layout:
    """The stream's occupied spans (needles) and cut points (snapshots), for placing needles."""

    def __init__(self, cuts: Iterable[int]):
        self.cuts = sorted(cuts)
        self.spans: list[tuple[int, int]] = []  # sorted, disjoint [a, b)

    def free(self, a: int, b: int) -> bool:
        """[a, b) overlaps no needle and no snapshot point falls strictly inside it."""
        i = bisect.bisect_left(self.spans, (a, b))
        if i > 0 and self.spans[i - 1][1] > a:
            return False
        if i < len(self.spans) and self.spans[i][0] < b:
            return False
        j = bisect.bisect_right(self.cuts, a)
        return j == len(self.cuts) or self.cuts[j] >= b

    def place(self, end: int, distance: int, n_tokens: int, first: int) -> int:
        """The latest start at or before `end - distance` (and at or after `first`) where a needle
        of `n_tokens` fits; raises if none within a quarter of the distance."""
        for start in range(end - distance, max(first, end - distance - distance // 4) - 1, -1):
            if self.free(start, start + n_tokens):
                bisect.insort(self.spans, (start, start + n_tokens))
                return start
        raise ValueError(f"no room for a needle {distance} tokens before stream index {end}: "
                         "space the snapshots further apart (--spacing) or ask fewer distances")


def make_plan(tokenize: Callable[[str], list[int]], filler: Callable[[int], Sequence[int]], *,
              distances: Sequence[int], trials: int = 10, spacing: int = 1024, kinds: Sequence[str] = VERBATIM_KINDS,
              seed: int = 0, prefix: Sequence[int] = (), filler_name: str = "") -> RecallPlan:
    """Lay out a recall stream. `tokenize(text)`: token ids of a needle's text (no BOS);
    `filler(n)`: the first n filler token ids, the same on every call (a text's tokens from a fixed
    offset); `prefix`: tokens the stream starts with (the model's BOS). The needles are drawn from
    `seed`; questions are in snapshot order."""
    distances = tuple(sorted(set(int(d) for d in distances)))
    if not distances or distances[0] < 1:
        raise ValueError("ask at least one distance, each at least 1 token")
    if trials < 1:
        raise ValueError(f"need at least one trial (got {trials})")
    unknown = set(kinds) - set(KINDS)
    if not kinds or unknown:
        raise ValueError(f"needle kinds are {', '.join(KINDS)} (got {', '.join(kinds) or 'none'})")
    rng = np.random.default_rng(seed)
    maker = NeedleMaker(rng)
    def sentence(text: str) -> tuple[int, ...]:
        return tuple(tokenize("\n" + text + "\n"))

    drawn = []  # (snapshot, target, needle, tokens)
    for k in range(trials):
        for j, d in enumerate(distances):
            needle = maker.make(kinds[(k + j) % len(kinds)])
            drawn.append((k, d, needle, sentence(needle.statement)))
    longest = max(len(t) for *_, t in drawn)
    shortest = min(min([d] + [int(d * f) for _, f in n.extras]) for _, d, n, _ in drawn)
    if longest >= shortest:
        raise ValueError(f"the shortest distance ({shortest}, an extra sentence's included) must exceed a needle's "
                         f"length ({longest} tokens)")
    reach = max(max([d] + [int(d * f) for _, f in n.extras]) for _, d, n, _ in drawn)
    first = len(prefix) + longest  # leave filler before the farthest needle
    snapshots = [first + reach + reach // 4 + k * spacing for k in range(trials)]
    layout = Layout(snapshots)
    placed: list[PlacedNeedle] = []
    questions = []
    for k, d, needle, toks in sorted(drawn, key=lambda x: -x[1]):  # far needles first: they have least room
        start = layout.place(snapshots[k], d, len(toks), first=len(prefix))
        extras = []
        for text, f in needle.extras:
            extra = sentence(text)
            extras.append((layout.place(snapshots[k], int(d * f), len(extra), first=len(prefix)), extra))
        placed.append(PlacedNeedle(start, toks, needle, tuple(extras)))
        questions.append((k, len(placed) - 1, d, snapshots[k] - start))
    order = sorted(range(len(placed)), key=lambda i: placed[i].start)
    rank = {old: new for new, old in enumerate(order)}
    needles = [placed[i] for i in order]
    questions = sorted((Question(k, rank[i], d, dist) for k, i, d, dist in questions),
                       key=lambda q: (q.snapshot, q.target))

    n = snapshots[-1]
    tokens = np.empty(n, dtype=np.int32)
    tokens[:len(prefix)] = prefix
    is_needle = np.zeros(n, dtype=bool)
    for p in needles:
        for start, toks in ((p.start, p.tokens), *p.extras):
            tokens[start:start + len(toks)] = toks
            is_needle[start:start + len(toks)] = True
    is_needle[:len(prefix)] = True
    n_filler = int(n - is_needle.sum())
    text = np.asarray(filler(n_filler), dtype=np.int32)
    if text.size < n_filler:
        raise ValueError(f"the filler gave {text.size} tokens; the stream needs {n_filler}")
    tokens[~is_needle] = text[:n_filler]
    config = {"seed": seed, "trials": trials, "spacing": spacing, "kinds": list(kinds), "filler": filler_name,
              "stream_tokens": n}
    return RecallPlan(tokens, needles, snapshots, questions, distances, config)
