"""Eviction policies of the fixed-size KV cache: which cells stay when the cache is full.

``make_policy(name, **config)`` builds one by name; ``POLICIES`` maps the names to the classes.
Each policy is a dataclass of settings with a pure ``select(ids, attention, memory)``; see
``base.Policy`` for the contract with the cache controller.
"""
from __future__ import annotations

from dataclasses import fields

from .base import Policy, Selection
from .context_shift import ContextShift
from .full import Full
from .h2o import H2O
from .inf_mllm import InfMLLM
from .streaming_llm import StreamingLLM
from .window import Window

POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in
                                     (InfMLLM, H2O, StreamingLLM, Window, ContextShift, Full)}


def options(name: str) -> tuple[str, ...]:
    """The settings that policy ``name`` takes (its dataclass init fields)."""
    return tuple(f.name for f in fields(_policy_class(name)) if f.init)


def make_policy(name: str, **config) -> Policy:
    """Build the policy ``name`` with ``config``.

    Options set to None are left at the policy's default, and ignored when the policy does not take
    them (so a command line can pass every option it has); any other option the policy does not take
    raises ValueError, as does an unknown name or a bad value.
    """
    cls = _policy_class(name)
    takes = options(cls.name)
    kwargs = {}
    for key, value in config.items():
        if value is None:
            continue
        if key not in takes:
            raise ValueError(f"policy '{cls.name}' does not take option '{key}' "
                             f"(--{key.replace('_', '-')}); its options: {', '.join(takes)}")
        kwargs[key] = value
    if "budget" not in kwargs:
        raise ValueError(f"policy '{cls.name}' needs a budget: pass --budget N")
    return cls(**kwargs)


def _policy_class(name: str) -> type[Policy]:
    key = str(name).strip().lower().replace("_", "-")
    if key not in POLICIES:
        raise ValueError(f"unknown policy {name!r}: choose one of {', '.join(POLICIES)}")
    return POLICIES[key]


__all__ = ["POLICIES", "Policy", "Selection", "make_policy", "options",
           "InfMLLM", "H2O", "StreamingLLM", "Window", "ContextShift", "Full"]
