"""Eviction policies of the fixed-size KV cache: which cells stay when the cache is full.

``make_policy(name, **options)`` builds one by name; ``POLICIES`` maps the names to the classes;
``declared_options()`` lists every option of every policy as declared (the commands build their
flags from it); ``policy_grid`` crosses policies with swept options. See ``base`` for the
contract with the cache controller and docs/METHOD.md for the rules.
"""
from __future__ import annotations

import itertools
import typing
from dataclasses import dataclass
from typing import Any, Sequence

from .base import Observation, Policy, ScoredPolicy, Selection, flag
from .context_shift import ContextShift
from .full import Full
from .h2o import H2O
from .inf_mllm import InfMLLM
from .recent_only import RecentOnly
from .streaming_llm import StreamingLLM

POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in
                                     (InfMLLM, H2O, StreamingLLM, RecentOnly, ContextShift, Full)}
DEFAULT_POLICY = InfMLLM.name


def policy_class(name: str) -> type[Policy]:
    """The class of policy `name` (case and underscores forgiven); ValueError listing the names."""
    key = str(name).strip().lower().replace("_", "-")
    if key not in POLICIES:
        raise ValueError(f"unknown policy {name!r}: choose one of {', '.join(POLICIES)}")
    return POLICIES[key]


def make_policy(name: str, **options: Any) -> Policy:
    """The policy `name` with `options` (the others at their defaults). ValueError, naming the fix,
    on an unknown name, an option the policy does not take, or a bad value."""
    cls = policy_class(name)
    takes = [f.name for f in cls.options()]
    for key in options:
        if key not in takes:
            raise ValueError(f"policy '{cls.name}' does not take option '{key}' ({flag(key)}); "
                             f"its options: {', '.join(takes)}")
    return cls(**options)


def from_config(config: dict) -> Policy:
    """The policy of a `Policy.config()` record; an option the record lacks because it was written
    before the option existed takes the value the record ran with (its ``absent``)."""
    options = dict(config)
    cls = policy_class(options.pop("name"))
    for f in cls.options():
        if f.name not in options and f.metadata.get("absent") is not None:
            options[f.name] = f.metadata["absent"]
    return make_policy(cls.name, **options)


@dataclass(frozen=True)
class DeclaredOption:
    """One option name across the policies that take it."""
    name: str
    type: type
    help: str
    defaults: dict[str, Any]  # policy name -> its default

    def describe(self) -> str:
        """The help text with the policies that take the option and their defaults."""
        by_value: dict[Any, list[str]] = {}
        for policy, value in self.defaults.items():
            by_value.setdefault(value, []).append(policy)
        if len(self.defaults) == len(POLICIES) and len(by_value) == 1:
            return f"{self.help} (default {next(iter(by_value))})"
        where = "; ".join(f"{', '.join(names)}: {value}" for value, names in by_value.items())
        return f"{self.help} (default {where})"


def declared_options() -> dict[str, DeclaredOption]:
    """Every option of every policy, in declaration order, merged by name."""
    out: dict[str, DeclaredOption] = {}
    for cls in POLICIES.values():
        hints = typing.get_type_hints(cls)
        for f in cls.options():
            if f.name not in out:
                out[f.name] = DeclaredOption(f.name, hints[f.name], f.metadata["help"], {})
            out[f.name].defaults[cls.name] = f.default
    return out


def policy_grid(names: Sequence[str], sweeps: dict[str, Sequence[Any]] | None = None) -> list[Policy]:
    """Every policy of `names` crossed with the swept option values that it takes (streaming-llm
    takes no bias, so a bias sweep runs it once). Built before any model loads, so that a long
    sweep cannot fail hours in: ValueError on an unknown policy, a value a policy cannot take, a
    run named twice, or an option no named policy takes."""
    if not names:
        raise ValueError("name at least one policy")
    sweeps = {k: list(v) for k, v in (sweeps or {}).items() if v}
    classes = [policy_class(name) for name in names]
    unused = set(sweeps) - {f.name for cls in classes for f in cls.options()}
    if unused:
        raise ValueError(f"no policy of {', '.join(c.name for c in classes)} takes "
                         f"{', '.join(flag(k) for k in sorted(unused))}")
    grid = []
    for cls in classes:
        swept = {k: v for k, v in sweeps.items() if k in {f.name for f in cls.options()}}
        for values in itertools.product(*swept.values()):
            grid.append(cls(**dict(zip(swept, values))))
    configs = [tuple(p.config().items()) for p in grid]
    if len(set(configs)) != len(configs):
        raise ValueError("a policy or a setting is named twice")
    return grid


__all__ = ["POLICIES", "DEFAULT_POLICY", "DeclaredOption", "Observation", "Policy", "ScoredPolicy", "Selection",
           "declared_options", "from_config", "make_policy", "policy_class", "policy_grid",
           "InfMLLM", "H2O", "StreamingLLM", "RecentOnly", "ContextShift", "Full"]
