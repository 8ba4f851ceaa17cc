"""Attention scores of a text: decode it once with capture on, report, and draw them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .extras import pyplot
from .runtime import AttentionScores, Model, Runtime


@dataclass(frozen=True)
class TextAttention:
    model: str
    n_head: int
    window: int
    tokens: list[int]
    pieces: list[str]
    capture: AttentionScores

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "n_layer": len(self.capture.layers),
            "n_head": self.n_head,
            "window": self.window,
            "n_tokens": len(self.tokens),
            "positions": self.capture.positions.tolist(),
            "scores": [[float(v) for v in row] for row in self.capture.scores],
        }

    def share(self) -> np.ndarray:
        """Each position's share of all window attention, averaged over layers (sums to 1)."""
        s = self.capture.scores
        return (s / s.sum(axis=1, keepdims=True)).mean(axis=0)

    def summary(self, top: int = 10) -> str:
        share = self.share()
        lines = [f"{self.model}: {len(self.tokens)} tokens, window of {self.window} queries, "
                 f"{len(self.capture.layers)} layers x {self.n_head} heads",
                 f"attention sink (position 0): {share[0]:.1%} of all window attention",
                 f"top {min(top, len(share))} positions by attention share (mean over layers):"]
        for j in np.argsort(-share)[:top]:
            pos = int(self.capture.positions[j])
            lines.append(f"  pos {pos:6d}  {share[j]:7.2%}  {self.pieces[pos]!r}")
        return "\n".join(lines)


def text_attention(text: str, *, model=None, window: int = 32, n_gpu_layers: int = -1,
                   flash_attn: bool | None = None, cache_type_k: str = "f16", cache_type_v: str = "f16",
                   rpc: Sequence[str] = ()) -> TextAttention:
    """Decode `text` in one batch and capture the attention of its last `window` tokens. The text
    is checked against the model's training context before any cache is allocated."""
    if not text.strip():
        raise ValueError("the text is empty")
    with Model(model, n_gpu_layers=n_gpu_layers, rpc=rpc) as m:
        tokens = m.tokenize(text)
        if len(tokens) > m.n_ctx_train:
            raise ValueError(f"the text has {len(tokens)} tokens, more than the model's context of {m.n_ctx_train}")
        if window > len(tokens):
            raise ValueError(f"the window ({window}) is larger than the text ({len(tokens)} tokens)")
        with Runtime(m, n_ctx=-(-len(tokens) // 256) * 256, flash_attn=flash_attn, cache_type_k=cache_type_k,
                     cache_type_v=cache_type_v) as rt:
            rt.capture_scores(window)
            rt.decode(tokens, range(len(tokens)))
            pieces = [m.token_bytes(t).decode("utf-8", errors="backslashreplace") for t in tokens]  # a token may hold part of a character
            return TextAttention(m.name, m.n_head, window, tokens, pieces, rt.read_scores())


def plot_heatmap(result: TextAttention, path: str | Path) -> Path:
    """Layers x positions heatmap (log colour scale) over the mean share per position."""
    plt = pyplot("the attention heatmap (--png)")
    from matplotlib.colors import LogNorm

    scores = result.capture.scores
    per_layer = scores / scores.sum(axis=1, keepdims=True)
    fig, (top, heat) = plt.subplots(2, 1, figsize=(12, 7), sharex=True,
                                    gridspec_kw={"height_ratios": [1, 3]}, constrained_layout=True)
    pos = result.capture.positions
    top.bar(pos, result.share(), width=1.0, color="tab:red")
    top.set_yscale("log")
    top.set_ylabel("share (mean)")
    top.set_title(f"{result.model}: attention of the last {result.window} queries "
                  f"({len(result.tokens)} tokens); vertical lines are attention saddles")
    floor = max(per_layer[per_layer > 0].min(), 1e-6)
    im = heat.imshow(np.maximum(per_layer, floor), aspect="auto", interpolation="nearest",
                     norm=LogNorm(vmin=floor, vmax=1.0), cmap="magma",
                     extent=(pos[0] - 0.5, pos[-1] + 0.5, per_layer.shape[0] - 0.5, -0.5))
    heat.set_xlabel("token position")
    heat.set_ylabel("layer")
    fig.colorbar(im, ax=heat, label="share of the layer's window attention")
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
