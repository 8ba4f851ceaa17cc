"""Independent NumPy reference of llama.cpp's LLM_ARCH_LLAMA forward pass, for tests only.

It shares no code with the project or with llama.cpp: the weights are read and dequantized with
the `gguf` Python package and the forward pass is written out below, so it can check both the
attention scores exported by the patched llama.cpp and its logits.

For a list of token ids (one sequence, positions 0..n-1) `forward` returns

* scores [n_layer, n_tokens]: for each layer, the causal softmax attention probabilities of the
  last `n_window` query tokens, summed over the window's queries and over all query heads
  (each row sums to n_window * n_head);
* logits [n_vocab] of the last token.

Architecture notes (they follow llama.cpp's src/models/llama.cpp and ggml):

* GGUF tensor shapes are listed in ggml order (ne0 = input dim first); the dequantized NumPy
  arrays are [out, in], so a projection is `x @ W.T`.
* RoPE is type NORM: adjacent pairs (x[2i], x[2i+1]) are rotated by pos * base^(-2i/n_rot). The
  HF->GGUF converter permuted the Q/K weights so that this matches HF's rotate_half layout.
* GQA: query head h reads KV head h // (n_head / n_head_kv) (ggml mul_mat broadcasting).
* Scale 1/sqrt(head_dim), RMSNorm with eps from the GGUF, SwiGLU FFN, tied output head when
  `output.weight` is absent.

Quantization: the weights are exactly the GGUF's dequantized values, but llama.cpp's CPU backend
also rounds activations (Q8_x for quantized matmuls, F16 for the KV cache), so agreement is to
within those roundings, not bit-exact.
"""

from __future__ import annotations

import numpy as np
import gguf
from gguf import quants


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


class ReferenceModel:
    """Dequantized weights and hyper-parameters of a llama-architecture GGUF model."""

    def __init__(self, path: str, dtype=np.float32):
        reader = gguf.GGUFReader(path)
        arch = _field(reader, "general.architecture")
        if arch != "llama":
            raise ValueError(f"reference only implements the llama architecture, not {arch!r}")
        self.dtype = dtype
        self.n_layer = int(_field(reader, "llama.block_count"))
        self.n_embd = int(_field(reader, "llama.embedding_length"))
        self.n_head = int(_field(reader, "llama.attention.head_count"))
        self.n_head_kv = int(_field(reader, "llama.attention.head_count_kv", self.n_head))
        self.eps = float(_field(reader, "llama.attention.layer_norm_rms_epsilon"))
        self.head_dim = self.n_embd // self.n_head
        self.n_rot = int(_field(reader, "llama.rope.dimension_count", self.head_dim))
        self.rope_base = float(_field(reader, "llama.rope.freq_base", 10000.0))
        self.w = {}
        for t in reader.tensors:
            a = quants.dequantize(t.data, t.tensor_type)
            # ggml shape (ne0, ne1, ...) -> NumPy (..., ne1, ne0)
            self.w[t.name] = np.ascontiguousarray(a.reshape(tuple(reversed(t.shape.tolist()))), dtype=dtype)
        if "output.weight" not in self.w:
            self.w["output.weight"] = self.w["token_embd.weight"]  # tied embeddings
        assert self.w["blk.0.attn_q.weight"].shape == (self.n_head * self.head_dim, self.n_embd)
        assert self.w["blk.0.attn_k.weight"].shape == (self.n_head_kv * self.head_dim, self.n_embd)

    def rms_norm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * weight

    def rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """x: [n_tokens, n_heads, head_dim]. NORM mode: rotate adjacent pairs of the first n_rot dims."""
        half = self.n_rot // 2
        theta = pos[:, None].astype(np.float64) * self.rope_base ** (-2.0 * np.arange(half) / self.n_rot)
        cos = np.cos(theta)[:, None, :].astype(x.dtype)
        sin = np.sin(theta)[:, None, :].astype(x.dtype)
        out = x.copy()
        x0, x1 = x[..., 0:self.n_rot:2], x[..., 1:self.n_rot:2]
        out[..., 0:self.n_rot:2] = x0 * cos - x1 * sin
        out[..., 1:self.n_rot:2] = x0 * sin + x1 * cos
        return out

    def attention(self, il: int, x: np.ndarray, pos: np.ndarray, n_window: int):
        """Returns the attention output [n, n_embd] and the window scores [n] of layer il."""
        n, hd = x.shape[0], self.head_dim
        p = f"blk.{il}."
        q = (x @ self.w[p + "attn_q.weight"].T).reshape(n, self.n_head, hd)
        k = (x @ self.w[p + "attn_k.weight"].T).reshape(n, self.n_head_kv, hd)
        v = (x @ self.w[p + "attn_v.weight"].T).reshape(n, self.n_head_kv, hd)
        q, k = self.rope(q, pos), self.rope(k, pos)
        group = self.n_head // self.n_head_kv
        k = np.repeat(k, group, axis=1)  # query head h -> kv head h // group
        v = np.repeat(v, group, axis=1)
        kq = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd).astype(x.dtype)
        kq = np.where(np.tril(np.ones((n, n), dtype=bool))[None], kq, -np.inf)
        kq = np.exp(kq - kq.max(axis=-1, keepdims=True))
        probs = kq / kq.sum(axis=-1, keepdims=True)  # [head, query, key]
        window = min(n_window, n)
        scores = probs[:, n - window:, :].sum(axis=(0, 1))
        out = np.einsum("hqk,khd->qhd", probs, v).reshape(n, self.n_head * hd)
        return out @ self.w[p + "attn_output.weight"].T, scores

    def forward(self, tokens, n_window: int):
        """tokens: token ids at positions 0..n-1. Returns (scores [n_layer, n], last logits [n_vocab])."""
        tokens = np.asarray(tokens, dtype=np.int64)
        pos = np.arange(len(tokens))
        x = self.w["token_embd.weight"][tokens]
        scores = np.zeros((self.n_layer, len(tokens)), dtype=np.float64)
        for il in range(self.n_layer):
            p = f"blk.{il}."
            attn, scores[il] = self.attention(il, self.rms_norm(x, self.w[p + "attn_norm.weight"]), pos, n_window)
            x = x + attn
            h = self.rms_norm(x, self.w[p + "ffn_norm.weight"])
            gate = h @ self.w[p + "ffn_gate.weight"].T
            up = h @ self.w[p + "ffn_up.weight"].T
            x = x + (gate / (1.0 + np.exp(-gate)) * up) @ self.w[p + "ffn_down.weight"].T
        last = self.rms_norm(x[-1:], self.w["output_norm.weight"])
        logits = (last @ self.w["output.weight"].T)[0]
        return scores, logits


def reference_forward(model: ReferenceModel | str, tokens, n_window: int):
    """Convenience wrapper: `model` is a ReferenceModel or a GGUF path."""
    if isinstance(model, str):
        model = ReferenceModel(model)
    return model.forward(tokens, n_window)
