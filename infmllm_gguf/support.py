"""What the bounded cache does for a model: each capability probed on the model itself.

`probe(path)` loads a model in a small context and tries, in llama.cpp, what streaming needs:
attention capture (every captured layer's row must add up to one per query and head, or less
with attention sinks), eviction
of a middle range, re-indexing (shifting positions), per-layer compaction, and says which layers
are bounded. Images and the memory tier follow from those. `python -m infmllm_gguf.support --zoo`
prints the README's table over the zoo's random-weight models (`infmllm_gguf.zoo`).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import numpy as np

from .runtime import Runtime
from .runtime.runtime import CaptureError

YES = "yes"
N_PROBE = 24  # tokens decoded by the probe
N_WINDOW = 4  # captured queries


@dataclass(frozen=True)
class Support:
    """One row of the support table: "yes", or "no: why"."""

    architecture: str
    bounded_layers: str
    capture: str
    eviction: str
    reindex: str
    per_layer: str
    images: str
    memory: str


def _capture(rt: Runtime) -> str:
    rt.capture_scores(N_WINDOW)
    rt.decode(list(range(3, 3 + N_PROBE)), range(N_PROBE))
    try:
        captured = rt.read_scores()
    except CaptureError as e:
        return f"no: {e}"
    rt.capture_scores(0)
    # each query's softmax adds up to one per head over the cells (less with attention sinks, gpt-oss)
    most = N_WINDOW * rt.model.n_head * (1 + 1e-3)
    sums = captured.scores.sum(axis=1)
    missing = [layer for layer, s in zip(captured.layers, sums) if not 0 < s <= most]
    return YES if not missing else f"no: layers {missing} report no attention"


def probe(path: str | Path, *, n_threads: int = 2) -> Support:
    """The support row of the model at `path` (loaded on the CPU, flash attention off)."""
    with Runtime(path, n_ctx=256, n_gpu_layers=0, flash_attn=False, n_threads=n_threads) as rt:
        model = rt.model
        if not rt.kv_layers:
            no = "no: a recurrent model has no KV cache (its state is of fixed size already)"
            return Support(model.architecture, "none", no, no, no, no, no, no)
        kinds = "attention" if not model.is_hybrid else "attention; the recurrent layers keep their fixed state"
        layers = f"{len(rt.kv_layers)} of {model.n_layer} ({kinds})"
        capture = _capture(rt)
        rt.remove(4, 8)
        eviction = YES if rt.n_cached() == N_PROBE - 4 else "no: the cells were not removed"
        reindex = YES if rt.can_shift() else f"no: llama.cpp cannot shift {model.architecture}'s positions"
        if reindex == YES:
            rt.shift(8, N_PROBE, -4)
            rt.apply_pending_shifts()
        if rt.can_compact():
            keep = np.arange(N_PROBE - 4)
            rt.compact(np.stack([keep] * len(rt.kv_layers)))
            per_layer = YES
        else:
            per_layer = "no: " + ("sliding-window layers" if model.sliding_window else
                                  "MLA's compressed keys" if model.mla else "positions cannot be shifted")
        images = ("no: an M-RoPE image's positions cannot be shifted" if model.multi_axis_rope and reindex != YES
                  else eviction)
        return Support(model.architecture, layers, capture, eviction, reindex, per_layer, images, eviction)


def markdown(rows: list[Support]) -> str:
    """The rows as a Markdown table."""
    names = [f.name.replace("_", " ") for f in fields(Support)]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    lines += ["| " + " | ".join(astuple(row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def zoo_table() -> str:
    """The support table of every architecture in the zoo."""
    from . import zoo

    with tempfile.TemporaryDirectory() as d:
        return markdown([probe(zoo.write(Path(d) / f"{arch}.gguf", arch)) for arch in zoo.ARCHITECTURES])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infmllm_gguf.support", description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", help="GGUF files to probe")
    p.add_argument("--zoo", action="store_true", help="probe the zoo's model of every architecture")
    a = p.parse_args(argv)
    if not a.models and not a.zoo:
        p.error("name GGUF files or --zoo")
    table = zoo_table() if a.zoo else markdown([probe(m) for m in a.models])
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
