"""KV cache types against f16: bytes per cell, attention scores, perplexity."""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from ..perplexity import stream_perplexity
from ..policies import DEFAULT_POLICY, make_policy
from ..probes import device_label
from ..runtime import Model, Runtime
from ..session import SessionConfig
from .common import stream_tokens
from .stream import run_label


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
            run = stream_perplexity(ids[:tokens], model=loaded, config=SessionConfig(
                policy, chunk=chunk, flash_attn=flash_attn, n_threads=n_threads, cache_type_k=k, cache_type_v=v,
                memory=False))
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
