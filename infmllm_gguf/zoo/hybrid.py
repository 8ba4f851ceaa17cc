"""Tiny random-weight GGUFs of llama.cpp's hybrid architectures: attention layers (with a KV cache)
interleaved with recurrent ones (a state per sequence, no KV cache), which llama.cpp keeps in a
``llama_memory_hybrid``.

    qwen35         Qwen3.5: gated delta-net layers, gated full attention every 4th layer
                   (interleaved M-RoPE on a quarter of each head, q and k normed)
    lfm2           LFM2: short-convolution layers and attention layers (q/k norm, NEOX RoPE)
    nemotron_h     Nemotron-H: Mamba2 layers, attention layers without RoPE, ReLU^2 FFN-only layers
    granitehybrid  Granite 4.0-H: Mamba2 and attention layers (no RoPE), each followed by an FFN,
                   with Granite's embedding / residual / attention / logit scales

Every layer's kind is given by a pattern string: "A" attention, "R" recurrent, "F" FFN only.
The recurrent parameters are chosen so that the state stays bounded over any number of tokens:
the decay ``ssm_a`` (stored by the converters as -exp(A_log)) is a negative constant, the time-step
bias moderate, the skip ``ssm_d`` 1 and the convolution kernels a short moving sum. The
convolution kernels and every SSM constant are written as f32 fills whatever the dtype: ggml's
``ssm_conv`` reads an f32 kernel only, and a kernel of 3 or 4 columns could not be quantized anyway.
"""
from __future__ import annotations

import math

from ._writer import Spec, fill, matrix, norm

ARCHS: tuple[str, ...] = ("qwen35", "lfm2", "nemotron_h", "granitehybrid")

N_VOCAB = 512
N_EMBD = 128
N_CTX_TRAIN = 262_144  # as Qwen3.5's: a full cache of a 100k-token stream fits (bench)
RMS_EPS = 1e-6

# Qwen3.5 makes every 4th layer full attention (llama.cpp's default full_attention_interval too).
_QWEN35_INTERVAL = 4
_PATTERNS = {
    "qwen35": "".join("A" if (il + 1) % _QWEN35_INTERVAL == 0 else "R" for il in range(8)),  # RRRARRRA
    "lfm2": "RRARAR",
    "nemotron_h": "RFRAFRAF",  # Nemotron-H's "M-M*-M*-": M Mamba2, * attention, - MLP
    "granitehybrid": "RRARRA",
}

_SSM_A = -0.5  # decay rate per unit time step: the state forgets, never grows


def attention_layers(arch: str) -> list[int]:
    """Indices of the layers that have a KV cache (attention layers) in build(arch)'s model."""
    return [il for il, kind in enumerate(_pattern(arch)) if kind == "A"]


def build(arch: str) -> tuple[dict, list[Spec], int]:
    """(metadata, specs, n_vocab) of a tiny random model of `arch`."""
    _pattern(arch)  # ValueError for an unknown arch
    metadata, specs = _BUILDERS[arch]()
    return metadata, specs, N_VOCAB


def _pattern(arch: str) -> str:
    if arch not in _PATTERNS:
        raise ValueError(f"unknown hybrid architecture {arch!r}; known: {', '.join(ARCHS)}")
    return _PATTERNS[arch]


# ---------------------------------------------------------------------------------------------
# tensor specs shared by the families

def _conv(name: str, channels: int, width: int) -> Spec:
    """A causal depthwise convolution kernel: a moving sum of `width` tokens scaled to keep the
    variance of independent inputs."""
    return fill(name + ".weight", (channels, width), 1.0 / math.sqrt(width))


def _embeddings(tied: bool, output_norm: str = "output_norm") -> list[Spec]:
    """token_embd (std 1, or 1/sqrt(n_embd) when it is also the output matrix), the final norm
    and, untied, the output matrix."""
    specs = [("token_embd.weight", (N_VOCAB, N_EMBD), 1.0 / math.sqrt(N_EMBD) if tied else 1.0),
             norm(output_norm + ".weight", N_EMBD)]
    if not tied:
        specs.append(matrix("output" + ".weight", N_VOCAB, N_EMBD))
    return specs


def _attention(b: str, n_head: int, n_head_kv: int, head_dim: int, *, q_factor: int = 1) -> list[Spec]:
    """q, k, v and output projections; q_factor 2 gives Qwen3.5's q projection, which carries a
    per-head output gate beside each query."""
    return [matrix(b + "attn_q" + ".weight", q_factor * n_head * head_dim, N_EMBD),
            matrix(b + "attn_k" + ".weight", n_head_kv * head_dim, N_EMBD),
            matrix(b + "attn_v" + ".weight", n_head_kv * head_dim, N_EMBD),
            matrix(b + "attn_output" + ".weight", N_EMBD, n_head * head_dim)]


def _qk_norms(b: str, head_dim: int) -> list[Spec]:
    return [norm(b + "attn_q_norm" + ".weight", head_dim), norm(b + "attn_k_norm" + ".weight", head_dim)]


def _ffn(b: str, n_ff: int, *, gated: bool = True) -> list[Spec]:
    """SwiGLU (gate, up, down), or the ungated up/down of Nemotron-H's ReLU^2 MLP."""
    specs = [matrix(b + "ffn_gate" + ".weight", n_ff, N_EMBD)] if gated else []
    return specs + [matrix(b + "ffn_up" + ".weight", n_ff, N_EMBD), matrix(b + "ffn_down" + ".weight", N_EMBD, n_ff)]


def _per_layer(pattern: str, kind: str, value: int) -> list[int]:
    """`value` on the layers of `kind`, 0 elsewhere: lfm2, nemotron_h and granitehybrid tell their
    layers apart by a per-layer head_count_kv (0: recurrent) and, nemotron_h, feed_forward_length."""
    return [value if k == kind else 0 for k in pattern]


def _base_metadata(n_layer: int, n_head: int, n_head_kv, n_ff) -> dict:
    """Keys every family reads (n_head_kv and n_ff: a number or one per layer)."""
    return {
        ".context_length": N_CTX_TRAIN,
        ".embedding_length": N_EMBD,
        ".block_count": n_layer,
        ".feed_forward_length": n_ff,
        ".attention.head_count": n_head,
        ".attention.head_count_kv": n_head_kv,
        ".attention.layer_norm_rms_epsilon": RMS_EPS,
    }


def _ssm_metadata(d_conv: int, d_inner: int, d_state: int, dt_rank: int, n_group: int) -> dict:
    """The ssm.* keys llama.cpp requires of Mamba2 and gated delta-net layers alike."""
    return {".ssm.conv_kernel": d_conv, ".ssm.inner_size": d_inner, ".ssm.state_size": d_state,
            ".ssm.time_step_rank": dt_rank, ".ssm.group_count": n_group}


# Mamba2 mixer (nemotron_h, granitehybrid): 8 heads of 32 channels, 32-wide state, 4-tap conv.
_M2_HEADS, _M2_HEAD_DIM, _M2_STATE, _M2_CONV = 8, 32, 32, 4
_M2_INNER = _M2_HEADS * _M2_HEAD_DIM  # 256 = 2 * n_embd, the only expansion granitehybrid accepts


def _mamba2_metadata(n_group: int) -> dict:
    # time_step_rank is the number of SSM heads in llama.cpp's Mamba2 (not Mamba1's dt rank)
    return _ssm_metadata(_M2_CONV, _M2_INNER, _M2_STATE, _M2_HEADS, n_group)


def _mamba2(b: str, n_group: int) -> list[Spec]:
    """One Mamba2 mixer: in_proj to (z, x, B, C, dt), conv over (x, B, C), scan, gated grouped
    RMS norm, out_proj."""
    conv_ch = _M2_INNER + 2 * n_group * _M2_STATE
    return [
        matrix(b + "ssm_in" + ".weight", 2 * _M2_INNER + 2 * n_group * _M2_STATE + _M2_HEADS, N_EMBD),
        _conv(b + "ssm_conv1d", conv_ch, _M2_CONV),
        # optional for the loader, but the graph adds it unconditionally
        fill(b + "ssm_conv1d.bias", (conv_ch,), 0.0),
        # dt = softplus(x + bias) ~ 0.2: a decay of exp(0.2 * A) ~ 0.9 per token
        fill(b + "ssm_dt.bias", (_M2_HEADS,), -2.0),
        fill(b + "ssm_a", (_M2_HEADS, 1), _SSM_A),
        fill(b + "ssm_d", (_M2_HEADS, 1), 1.0),
        # a 2-D norm (one row per group), so written as an f32 fill of ones
        fill(b + "ssm_norm.weight", (n_group, _M2_INNER // n_group), 1.0),
        matrix(b + "ssm_out" + ".weight", N_EMBD, _M2_INNER),
    ]


# ---------------------------------------------------------------------------------------------
# the families

def _qwen35() -> tuple[dict, list[Spec]]:
    """Qwen3.5 (0.8B's proportions): head_dim 64 with 16 rotary dimensions (the real 64 of 256),
    M-RoPE sections 3:3:2 as the real 11:11:10; delta-net with 2 key heads and 4 value heads of 32."""
    pattern = _PATTERNS["qwen35"]
    n_head, n_head_kv, head_dim, n_rot, n_ff = 4, 2, 64, 16, 256
    d_conv, k_heads, v_heads, head_kv_dim = 4, 2, 4, 32
    key_dim, value_dim = k_heads * head_kv_dim, v_heads * head_kv_dim
    # head_count_kv is one number: qwen35 places its attention layers by full_attention_interval
    metadata = _base_metadata(len(pattern), n_head, n_head_kv, n_ff)
    metadata.update({
        ".attention.key_length": head_dim,
        ".attention.value_length": head_dim,
        ".rope.dimension_count": n_rot,
        # required, 4 values summing to n_rot / 2; the 4th 0 keeps the K cache shiftable
        ".rope.dimension_sections": [3, 3, 2, 0],
        ".rope.freq_base": 10_000_000.0,
        ".full_attention_interval": _QWEN35_INTERVAL,
        # state_size is the key head size (also the value head size in llama.cpp's loader),
        # group_count the key heads, time_step_rank the value heads
        **_ssm_metadata(d_conv, value_dim, head_kv_dim, v_heads, k_heads),
    })
    specs = _embeddings(tied=True)
    for il, kind in enumerate(pattern):
        b = f"blk.{il}."
        specs += [norm(b + "attn_norm" + ".weight", N_EMBD), norm(b + "post_attention_norm" + ".weight", N_EMBD)]
        if kind == "A":
            specs += _attention(b, n_head, n_head_kv, head_dim, q_factor=2) + _qk_norms(b, head_dim)
        else:
            specs += [
                matrix(b + "attn_qkv" + ".weight", 2 * key_dim + value_dim, N_EMBD),
                matrix(b + "attn_gate" + ".weight", value_dim, N_EMBD),  # z, the output gate
                _conv(b + "ssm_conv1d", 2 * key_dim + value_dim, d_conv),
                # decay g = softplus(alpha + dt_bias) * ssm_a; beta = sigmoid(ssm_beta x)
                fill(b + "ssm_dt.bias", (v_heads,), 0.0),
                fill(b + "ssm_a", (v_heads,), _SSM_A),
                matrix(b + "ssm_beta" + ".weight", v_heads, N_EMBD),
                matrix(b + "ssm_alpha" + ".weight", v_heads, N_EMBD),
                norm(b + "ssm_norm" + ".weight", head_kv_dim),
                matrix(b + "ssm_out" + ".weight", N_EMBD, value_dim),
            ]
        specs += _ffn(b, n_ff)
    return metadata, specs


def _lfm2() -> tuple[dict, list[Spec]]:
    """LFM2: tied embeddings, a final norm named token_embd_norm, head_dim = n_embd / n_head,
    short convolutions over 3 tokens (L_cache, as the real models)."""
    pattern = _PATTERNS["lfm2"]
    n_head, n_head_kv, n_ff, l_cache = 4, 2, 256, 3
    head_dim = N_EMBD // n_head
    metadata = _base_metadata(len(pattern), n_head, _per_layer(pattern, "A", n_head_kv), n_ff)
    metadata.update({".shortconv.l_cache": l_cache, ".rope.freq_base": 1_000_000.0})
    specs = _embeddings(tied=True, output_norm="token_embd_norm")
    for il, kind in enumerate(pattern):
        b = f"blk.{il}."
        specs.append(norm(b + "attn_norm" + ".weight", N_EMBD))  # LFM2's operator_norm
        if kind == "A":
            specs += _attention(b, n_head, n_head_kv, head_dim) + _qk_norms(b, head_dim)
        else:
            specs += [
                matrix(b + "shortconv.in_proj" + ".weight", 3 * N_EMBD, N_EMBD),  # b, c, x gates
                _conv(b + "shortconv.conv", N_EMBD, l_cache),
                matrix(b + "shortconv.out_proj" + ".weight", N_EMBD, N_EMBD),
            ]
        specs += [norm(b + "ffn_norm" + ".weight", N_EMBD)] + _ffn(b, n_ff)
    return metadata, specs


def _nemotron_h() -> tuple[dict, list[Spec]]:
    """Nemotron-H: one norm per layer and one mixer (Mamba2, attention or MLP); llama.cpp reads
    the kind from head_count_kv and feed_forward_length (both 0: Mamba2)."""
    pattern = _PATTERNS["nemotron_h"]
    n_head, n_head_kv, head_dim, n_ff, n_group = 4, 2, 32, 256, 2
    metadata = _base_metadata(len(pattern), n_head, _per_layer(pattern, "A", n_head_kv),
                              _per_layer(pattern, "F", n_ff))
    metadata.update({
        ".attention.key_length": head_dim,
        ".attention.value_length": head_dim,
        ".attention.layer_norm_epsilon": RMS_EPS,  # required by nemotron_h's loader
        **_mamba2_metadata(n_group),
    })
    specs = _embeddings(tied=False)
    for il, kind in enumerate(pattern):
        b = f"blk.{il}."
        specs.append(norm(b + "attn_norm" + ".weight", N_EMBD))
        if kind == "A":
            specs += _attention(b, n_head, n_head_kv, head_dim)
        elif kind == "F":
            specs += _ffn(b, n_ff, gated=False)
        else:
            specs += _mamba2(b, n_group)
    return metadata, specs


def _granitehybrid() -> tuple[dict, list[Spec]]:
    """Granite 4.0-H: tied embeddings, Mamba2 with one group, attention without positions (the
    converter writes rope.scaling.finetuned false for Granite 4's hybrids; true would give
    Bamba's RoPE), and Granite's muP scales."""
    pattern = _PATTERNS["granitehybrid"]
    n_head, n_head_kv, n_ff, n_group = 4, 2, 256, 1
    head_dim = N_EMBD // n_head
    metadata = _base_metadata(len(pattern), n_head, _per_layer(pattern, "A", n_head_kv), n_ff)
    metadata.update({
        ".rope.scaling.finetuned": False,  # granitehybrid's switch: no RoPE
        # Granite's muP multipliers: embedding and residual as in Granite 3.0's configs; their
        # real attention 1/head_dim and logit 8 would leave random weights a near-uniform
        # attention (q.k std 0.18) and flat logits
        ".embedding_scale": 12.0,
        ".residual_scale": 0.22,
        ".attention.scale": 0.25,  # q.k std 1.4
        ".logit_scale": 2.0,
        **_mamba2_metadata(n_group),
    })
    specs = _embeddings(tied=True)
    for il, kind in enumerate(pattern):
        b = f"blk.{il}."
        specs.append(norm(b + "attn_norm" + ".weight", N_EMBD))
        specs += _attention(b, n_head, n_head_kv, head_dim) if kind == "A" else _mamba2(b, n_group)
        specs += [norm(b + "ffn_norm" + ".weight", N_EMBD)] + _ffn(b, n_ff)
    return metadata, specs


_BUILDERS = {"qwen35": _qwen35, "lfm2": _lfm2, "nemotron_h": _nemotron_h, "granitehybrid": _granitehybrid}
