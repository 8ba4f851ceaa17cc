"""The interface between eviction policies and the cache controller, and helpers they share.

A policy is a small dataclass of settings with one pure method, ``select``: given the stream
indices of the cells cached now (``ids``), the attention the retrieval window gave them
(``attention``) and the score the policy carried from its previous selection (``memory``), it says
which cells stay. It keeps no state of its own: the controller carries ``Selection.memory`` to the
next call, aligned with the surviving ids (cells new since then get 0).

Everything here is NumPy only, so the policies can be tested without a model.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np

LAYER_REDUCTIONS = ("mean", "max")


@dataclass(frozen=True)
class Selection:
    """The outcome of one eviction.

    keep:   bool[n], True = the cell stays; survivors are ``ids[keep]``, in stream order.
    memory: float64[n_kept], the policy's accumulated score of the kept cells, aligned with
            ``ids[keep]``; None for policies that carry no score.
    """
    keep: np.ndarray
    memory: np.ndarray | None

    @property
    def n_kept(self) -> int:
        return int(np.count_nonzero(self.keep))


def flag(option: str) -> str:
    """The command-line flag of a policy option (``n_keep`` -> ``--n-keep``)."""
    return "--" + option.replace("_", "-")


def check_int(owner: object, option: str, minimum: int = 0) -> None:
    """Check that ``owner.option`` is an integer >= minimum, and store it as a plain int."""
    value = getattr(owner, option)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{option} must be an integer (got {value!r}): pass {flag(option)} N")
    if value < minimum:
        raise ValueError(f"{option} must be >= {minimum} (got {value}): "
                         f"pass {flag(option)} {minimum} or more")
    setattr(owner, option, int(value))


def check_float(owner: object, option: str, lo: float, hi: float | None = None) -> None:
    """Check that ``owner.option`` is a real number in [lo, hi], and store it as a float."""
    value = getattr(owner, option)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{option} must be a number (got {value!r}): pass {flag(option)} X")
    value = float(value)
    if not np.isfinite(value) or value < lo or (hi is not None and value > hi):
        span = f">= {lo:g}" if hi is None else f"in [{lo:g}, {hi:g}]"
        raise ValueError(f"{option} must be {span} (got {value:g}): pass {flag(option)} with a value {span}")
    setattr(owner, option, value)


@dataclass
class Policy:
    """Base class of the eviction policies (subclasses are dataclasses too).

    budget: cells kept after an eviction.
    recent: the most recent tokens (highest ids) always kept.
    sinks:  the first tokens of the stream (ids < sinks) always kept, when still cached; 0 = none.

    ``select`` is called only when the cache holds more than ``budget`` cells and returns exactly
    ``budget`` kept cells (``exact_budget``; context-shift keeps at most ``budget``).
    """
    budget: int
    recent: int = 64
    sinks: int = 0

    name: ClassVar[str] = "base"
    exact_budget: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError, naming the fix, when the settings cannot work."""
        check_int(self, "budget")
        check_int(self, "recent")
        check_int(self, "sinks")
        if self.budget <= self.recent + self.sinks:
            raise ValueError(f"budget ({self.budget}) must exceed recent + sinks ({self.recent + self.sinks}): "
                             f"raise --budget or lower --recent/--sinks")

    def capture_window(self, chunk: int) -> int:
        """How many queries (the last ones) of each decoded chunk the controller must capture
        attention for; 0 = the policy reads no scores."""
        _check_chunk(chunk)
        return 0

    @property
    def needs_attention(self) -> bool:
        """Whether ``select`` reads attention scores (and so needs the capture patch)."""
        return self.capture_window(1) > 0

    def select(self, ids: np.ndarray, attention: np.ndarray | None,
               memory: np.ndarray | None) -> Selection:
        raise NotImplementedError

    def config(self) -> dict:
        """The policy's name and settings, for logs and result files."""
        return {"policy": self.name, **{f.name: getattr(self, f.name) for f in fields(self)}}


def _check_chunk(chunk: int) -> None:
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 0:
        raise ValueError(f"chunk must be a non-negative number of tokens (got {chunk!r})")


def check_inputs(policy: Policy, ids: np.ndarray, attention: np.ndarray | None,
                 memory: np.ndarray | None, *, need_attention: bool
                 ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Validate the arguments of ``select``; return ids (int64), attention (float64 [n_layer, n])
    and memory (float64 [n]) as new arrays or read-only views, never the caller's to mutate."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be a 1-D integer array (got shape {ids.shape}, dtype {ids.dtype})")
    ids = ids.astype(np.int64, copy=False)
    n = ids.size
    if n <= policy.budget:
        raise ValueError(f"select is called only when the cache holds more cells ({n}) than the "
                         f"budget ({policy.budget})")
    if ids[0] < 0 or np.any(np.diff(ids) <= 0):
        raise ValueError("ids must be non-negative stream indices in strictly increasing order")
    if not need_attention:
        return ids, None, None
    if attention is None:
        raise ValueError(f"policy '{policy.name}' needs attention scores: capture "
                         f"capture_window(chunk) queries of each chunk and pass them to select")
    attention = np.asarray(attention, dtype=np.float64)
    if attention.ndim != 2 or attention.shape[1] != n or attention.shape[0] < 1:
        raise ValueError(f"attention must be [n_layer, n] = [*, {n}] (got shape {attention.shape})")
    if not np.all(np.isfinite(attention)):
        raise ValueError("attention has non-finite values")
    if memory is not None:
        memory = np.asarray(memory, dtype=np.float64)
        if memory.shape != (n,):
            raise ValueError(f"memory must be aligned with ids: shape ({n},) (got {memory.shape})")
        if not np.all(np.isfinite(memory)):
            raise ValueError("memory has non-finite values")
    return ids, attention, memory


def protected(ids: np.ndarray, recent: int, sinks: int) -> np.ndarray:
    """bool[n]: the cells every policy keeps: the sinks present (ids < sinks) and the ``recent``
    highest ids."""
    keep = ids < sinks
    if recent > 0:
        keep[-recent:] = True
    return keep


def age_rank(m: int) -> np.ndarray:
    """The age rank of m candidates in stream order, scaled to [0, 1] (0 oldest, 1 newest)."""
    return np.linspace(0.0, 1.0, m) if m > 1 else np.zeros(m)


def keep_top(keep: np.ndarray, score: np.ndarray, budget: int) -> np.ndarray:
    """Add to the protected cells ``keep`` the best-scored other cells, up to ``budget`` in all;
    on equal scores the newer cell wins. Returns a new mask."""
    candidates = np.flatnonzero(~keep)
    k = budget - int(np.count_nonzero(keep))
    if k < 0 or k > candidates.size:
        raise ValueError(f"cannot keep {budget} cells: {keep.sum()} protected, {candidates.size} candidates")
    # lexsort: last key is primary. Score descending, then position descending (newer first).
    order = np.lexsort((-candidates, -score[candidates]))[:k]
    out = keep.copy()
    out[candidates[order]] = True
    return out
