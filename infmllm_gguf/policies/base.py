"""The contract between eviction policies and the cache controller, and the scored-policy base.

A policy is a dataclass of options with one pure method, ``select(observation)``: given what the
controller observed of the cached cells since the last eviction (an `Observation`: their stream
indices, the attention the captured queries gave them, how many of those queries could see each
cell, and the score the policy carried from its previous selection), it says which cells stay. It
keeps no state of its own: the controller hands ``Selection.carried`` back at the next eviction,
aligned with the survivors (cells new since then carry 0).

Each option is declared once, as a dataclass field made by `option` (type, default, help text,
bounds): validation, the commands' flags and the result records all read that declaration.
What the controller must do for a policy (capture attention or not, how many queries of a chunk,
whether to add up the attention of several decodes) is declared by the policy too.

Everything here is NumPy only, so the policies can be tested without a model. The rule of each
policy is written out in docs/METHOD.md.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np


def option(default: Any, help: str, *, minimum: float | None = None, maximum: float | None = None,
           choices: tuple[str, ...] | None = None, absent: Any = None) -> Any:
    """A policy option: a dataclass field with its help text and bounds. ``absent``, for an option
    added later, is the value that records written before it existed ran with (`from_config`)."""
    return field(default=default, metadata={"help": help, "minimum": minimum, "maximum": maximum,
                                            "choices": choices, "absent": absent})


def default_of(owner: type, name: str, default: Any) -> Any:
    """The option `name` declared on `owner`, with another default (a subclass's)."""
    declared = next(f for f in dataclasses.fields(owner) if f.name == name)
    return field(default=default, metadata=declared.metadata)


def fixed(value: Any) -> Any:
    """An inherited option that this policy does not take: set to `value`, not an init argument."""
    return field(default=value, init=False)


def flag(name: str) -> str:
    """The command-line flag of option `name` (``n_keep`` -> ``--n-keep``)."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Observation:
    """What the controller saw of the n cached cells since the last eviction.

    stream_indices: int64[n], each cell's token number in the stream, strictly increasing.
    attention:      float[n_layer, n], the attention each layer's captured queries gave each cell,
                    summed over heads and queries; None for policies that read none.
    visibility:     float[n], how many of those queries could attend to each cell (a causal query
                    sees only the cells before it); None with attention None.
    carried:        float64[n], the score the policy carried from its last selection (new cells
                    0); None before the first.

    A policy that decides per layer (Inf-MLLM's ``granularity`` "layer") takes ``stream_indices``
    and ``carried`` as [n_layer, n]: each layer's own cells.
    """
    stream_indices: np.ndarray
    attention: np.ndarray | None = None
    visibility: np.ndarray | None = None
    carried: np.ndarray | None = None


@dataclass(frozen=True)
class Selection:
    """The outcome of one eviction.

    keep:    bool[n], True = the cell stays; survivors are ``stream_indices[keep]``, in stream order.
    carried: float64[n_kept], the policy's score of the kept cells, aligned with them, to be handed
             back at the next eviction; None for policies that carry no score.
    Per layer: ``keep`` bool[n_layer, n] with ``budget`` cells in each row, ``carried`` [n_layer, budget].
    """
    keep: np.ndarray
    carried: np.ndarray | None

    @property
    def n_kept(self) -> int:
        return int(np.count_nonzero(self.keep))


@dataclass
class Policy:
    """Base class of the eviction policies (each a dataclass).

    ``select`` is called only when the cache holds more than ``budget`` cells, and keeps exactly
    ``budget`` cells (``exact_budget``; context-shift keeps at most ``budget``).
    """
    budget: int = option(1024, "cells the cache keeps", minimum=1)
    recent: int = option(64, "the most recent tokens, always kept", minimum=0)
    sinks: int = option(0, "the first tokens of the stream, always kept while cached", minimum=0)

    name: ClassVar[str] = "base"
    exact_budget: ClassVar[bool] = True
    reads_attention: ClassVar[bool] = False  # the controller captures scores only for those that do
    evicts: ClassVar[bool] = True  # False: the cache only grows (`full`), nothing for a memory to bring back

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in self.options():
            _check_option(self, f, hints[f.name])
        self.check()

    def check(self) -> None:
        """Raise ValueError, naming the fix, when the options cannot work together."""
        if self.budget <= self.recent + self.sinks:
            raise ValueError(f"budget ({self.budget}) must exceed recent + sinks ({self.recent + self.sinks}): "
                             f"raise --budget or lower --recent/--sinks")

    @classmethod
    def options(cls) -> tuple[dataclasses.Field, ...]:
        """The options this policy takes (its init fields), as declared."""
        return tuple(f for f in dataclasses.fields(cls) if f.init)

    @property
    def min_cells(self) -> int:
        """The fewest cells an eviction can leave: the sinks and one more."""
        return self.sinks + 1

    def with_budget(self, budget: int) -> "Policy":
        """This policy at another budget (the memory makes room with a smaller one), `recent` cut
        to fit it."""
        changes: dict[str, Any] = {"budget": budget}
        if "recent" in {f.name for f in self.options()}:
            changes["recent"] = min(self.recent, max(budget - self.sinks - 1, 0))
        return dataclasses.replace(self, **changes)

    def check_chunk(self, chunk: int) -> None:
        """Raise ValueError, naming the fix, if the policy cannot work on chunks of `chunk` tokens."""

    def capture_queries(self, chunk: int) -> int:
        """How many queries (the last ones) of a decoded chunk of `chunk` tokens the controller
        must capture attention for; 0 for a policy that reads none."""
        return 0

    @property
    def accumulates_attention(self) -> bool:
        """Whether ``select`` wants the attention of every decode since the last eviction added up
        (else the last decode's alone)."""
        return False

    def select(self, observation: Observation) -> Selection:
        raise NotImplementedError

    def config(self) -> dict:
        """The policy's name and every option, for result records and saved sessions;
        ``make_policy(**config)`` builds it again."""
        return {"name": self.name, **{f.name: getattr(self, f.name) for f in self.options()}}

    def label(self) -> str:
        """The name, the budget and the options that differ from the policy's defaults."""
        parts = [self.name, f"budget {self.budget}"]
        for f in self.options():
            value = getattr(self, f.name)
            if f.name != "budget" and value != f.default:
                parts.append(f"{f.name} {value:g}" if isinstance(value, (int, float)) else f"{f.name} {value}")
        return ", ".join(parts)


def _check_option(owner: Policy, f: dataclasses.Field, kind: type) -> None:
    """Check one option against its declaration; store ints and floats as plain Python numbers."""
    value, meta = getattr(owner, f.name), f.metadata
    lo, hi, choices = meta.get("minimum"), meta.get("maximum"), meta.get("choices")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{f.name} must be an integer (got {value!r}): pass {flag(f.name)} N")
        value = int(value)
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not np.isfinite(value):
            raise ValueError(f"{f.name} must be a finite number (got {value!r}): pass {flag(f.name)} X")
        value = float(value)
    elif choices is not None and value not in choices:
        raise ValueError(f"unknown {f.name} {value!r}: pass {flag(f.name)} {' or '.join(choices)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f">= {lo:g}" if hi is None else f"in [{lo:g}, {hi:g}]"
        raise ValueError(f"{f.name} must be {span} (got {value:g}): pass {flag(f.name)} with a value {span}")
    setattr(owner, f.name, value)


def checked(policy: Policy, obs: Observation) -> Observation:
    """``obs`` validated for ``policy.select``, its arrays as int64/float64 copies or read-only
    views, never the caller's to mutate. ValueError names what is wrong."""
    indices = np.asarray(obs.stream_indices)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"stream_indices must be a 1-D integer array (got shape {indices.shape}, dtype {indices.dtype})")
    indices = indices.astype(np.int64, copy=False)
    n = indices.size
    if n <= policy.budget:
        raise ValueError(f"select is called only when the cache holds more cells ({n}) than the "
                         f"budget ({policy.budget})")
    if indices[0] < 0 or np.any(np.diff(indices) <= 0):
        raise ValueError("stream_indices must be non-negative and strictly increasing")
    if not policy.reads_attention:
        return Observation(indices)
    if obs.attention is None or obs.visibility is None:
        raise ValueError(f"policy '{policy.name}' reads attention: pass the attention of the captured queries "
                         "and their visibility")
    attention = np.asarray(obs.attention, dtype=np.float64)
    if attention.ndim != 2 or attention.shape[1] != n or attention.shape[0] < 1:
        raise ValueError(f"attention must be [n_layer, n] = [*, {n}] (got shape {attention.shape})")
    visibility = _aligned(obs.visibility, n, "visibility")
    if np.any(visibility < 1):
        raise ValueError("visibility must be at least 1 for every cell: each cell is seen by a captured query")
    carried = None if obs.carried is None else _aligned(obs.carried, n, "carried")
    if not np.all(np.isfinite(attention)):
        raise ValueError("attention has non-finite values")
    return Observation(indices, attention, visibility, carried)


def _aligned(values: np.ndarray, n: int, name: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (n,):
        raise ValueError(f"{name} must be aligned with the cells: shape ({n},) (got {values.shape})")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} has non-finite values")
    return values


def protected(stream_indices: np.ndarray, recent: int, sinks: int) -> np.ndarray:
    """bool[n]: the cells every policy keeps: the sinks present (stream index < sinks) and the
    ``recent`` newest."""
    keep = stream_indices < sinks
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


GRANULARITIES = ("auto", "token", "layer")


def granularity_option(default: str) -> Any:
    """The option of a scoring policy that reads attention: one eviction decision for all layers,
    or one per layer (`ScoredPolicy.select`)."""
    return option(default, "one eviction decision for all layers (token), one per layer (layer), or per layer "
                  "where the cache allows it (auto)", choices=GRANULARITIES, absent="token")


class ScoredPolicy(Policy):
    """A policy that ranks cells by a score (as kvpress's ``ScorerPress``): the base validates the
    observation, protects the sinks and the recent cells, keeps the best-scored others up to the
    budget (equal scores: the newer wins) and builds the `Selection`. A subclass implements
    ``score`` only.

    Per layer: a subclass that declares ``granularity`` (`granularity_option`) decides for each
    layer apart when it is "layer", or "auto" with ``stream_indices`` given per layer: the same
    rule on each layer's own row (its cells, its attention, its carried score), ``keep`` and
    ``carried`` returned per layer ([n_layer, n] and [n_layer, budget]); the controller settles
    "auto" and compacts each layer's cache on its own (`Runtime.compact`)."""

    def score(self, obs: Observation, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(score[n], carried[n] or None) for the validated observation; `candidates` (bool[n]) are
        the cells not protected, the only ones whose score counts."""
        raise NotImplementedError

    def select(self, observation: Observation) -> Selection:
        granularity = getattr(self, "granularity", "token")
        if granularity == "layer" or (granularity == "auto" and np.ndim(observation.stream_indices) == 2):
            return self._select_per_layer(observation)
        obs = checked(self, observation)
        keep = protected(obs.stream_indices, self.recent, self.sinks)
        score, carried = self.score(obs, ~keep)
        keep = keep_top(keep, score, self.budget)
        return Selection(keep, None if carried is None else carried[keep])

    def _select_per_layer(self, observation: Observation) -> Selection:
        if observation.attention is None:
            raise ValueError(f"policy '{self.name}' reads attention: pass the attention of the captured queries "
                             "and their visibility")
        if np.ndim(observation.attention) != 2 or np.shape(observation.attention)[0] < 1:
            raise ValueError(f"attention must be [n_layer, n] (got shape {np.shape(observation.attention)})")
        n_layer = np.shape(observation.attention)[0]
        indices, carried = np.asarray(observation.stream_indices), observation.carried
        if indices.ndim == 1:  # every layer holds the same cells (before the first per-layer eviction)
            indices = np.broadcast_to(indices, (n_layer, indices.size))
        if carried is not None and np.ndim(carried) == 1:
            carried = np.broadcast_to(carried, (n_layer, np.size(carried)))
        if indices.ndim != 2 or indices.shape[0] != n_layer or \
                (carried is not None and (np.ndim(carried) != 2 or np.shape(carried)[0] != n_layer)):
            raise ValueError(f"per-layer stream indices and carried scores must have one row per layer ({n_layer})")
        one_decision = dataclasses.replace(self, granularity="token")
        rows = [one_decision.select(Observation(indices[layer], observation.attention[layer:layer + 1],
                                                observation.visibility, None if carried is None else carried[layer]))
                for layer in range(n_layer)]
        return Selection(np.stack([r.keep for r in rows]),
                         None if rows[0].carried is None else np.stack([r.carried for r in rows]))
