"""Tiny random-weight transformers of llama.cpp's attention architectures, dense and MoE: qwen2,
qwen3, qwen3moe, phi3, mistral3, deepseek2 (MLA), gpt-oss, qwen2vl and qwen3vl.

`build(arch)` gives ``(metadata, specs, n_vocab)`` for `_writer.write_gguf`. Keys and tensor names
are those read by ``load_arch_hparams`` / ``load_arch_tensors`` in ``src/models/<arch>.cpp`` of the
llama.cpp vendored by llama-cpp-python 0.3.36. Each model is a few layers of n_embd 64..128 but
keeps what makes its architecture different (head_dim * n_head != n_embd, q/k norms, biases,
fused projections, experts, MLA, sinks, sliding windows, YaRN, M-RoPE sections), with the real
model's context length and RoPE settings. Weights follow `synthetic`: matrices normal with std
1/sqrt(fan_in), norms 1, token_embd std 1 with a separate output matrix; small random 1-D biases;
expert biases (2-D, which a quantized dtype would otherwise quantize) are zero f32 fills.
"""
from __future__ import annotations

import math

from ._writer import Spec, fill, matrix, norm

N_VOCAB = 512
_BIAS_STD = 0.1


def _bias(name: str, n: int) -> Spec:
    return (name, (n,), _BIAS_STD)


def _with_io(n_embd: int, blocks: list[Spec]) -> list[Spec]:
    """token_embd, the blocks, then the final norm and an untied output matrix."""
    return ([("token_embd.weight", (N_VOCAB, n_embd), 1.0)] + blocks
            + [norm("output_norm.weight", n_embd), matrix("output.weight", N_VOCAB, n_embd)])


def _hparams(*, n_embd: int, n_layer: int, n_head: int, n_head_kv: int, n_ff: int, n_ctx_train: int,
             rope_base: float, eps: float, head_dim: int | None = None) -> dict:
    """The keys every architecture here reads; head_dim, when given, is written as key/value
    length (llama.cpp's default is n_embd / n_head, and n_rot defaults to the key length)."""
    meta = {
        ".context_length": n_ctx_train,
        ".embedding_length": n_embd,
        ".block_count": n_layer,
        ".feed_forward_length": n_ff,
        ".attention.head_count": n_head,
        ".attention.head_count_kv": n_head_kv,
        ".attention.layer_norm_rms_epsilon": eps,
        ".rope.freq_base": rope_base,
    }
    if head_dim is not None:
        meta[".attention.key_length"] = meta[".attention.value_length"] = head_dim
    return meta


def _yarn(factor: float, orig_ctx: int, **extra) -> dict:
    """YaRN RoPE scaling as convert_hf_to_gguf writes it (extra: more rope.scaling.* keys)."""
    return {".rope.scaling.type": "yarn", ".rope.scaling.factor": factor,
            ".rope.scaling.original_context_length": orig_ctx,
            **{".rope.scaling." + k: v for k, v in extra.items()}}


def _attn(b: str, n_embd: int, n_head: int, n_head_kv: int, head_dim: int, *, qkv_bias: bool = False,
          qk_norm: bool = False, fused: bool = False, out_bias: bool = False) -> list[Spec]:
    """Pre-norm and GQA projections of block prefix `b`: separate q/k/v or one fused attn_qkv,
    optional q/k/v biases, per-head q/k RMS norms and output bias."""
    q, kv = n_head * head_dim, n_head_kv * head_dim
    specs = [norm(b + "attn_norm.weight", n_embd)]
    if fused:
        specs.append(matrix(b + "attn_qkv.weight", q + 2 * kv, n_embd))
    else:
        specs += [matrix(b + "attn_q.weight", q, n_embd), matrix(b + "attn_k.weight", kv, n_embd),
                  matrix(b + "attn_v.weight", kv, n_embd)]
    if qkv_bias:
        specs += [_bias(b + "attn_q.bias", q), _bias(b + "attn_k.bias", kv), _bias(b + "attn_v.bias", kv)]
    if qk_norm:
        specs += [norm(b + "attn_q_norm.weight", head_dim), norm(b + "attn_k_norm.weight", head_dim)]
    specs.append(matrix(b + "attn_output.weight", n_embd, q))
    if out_bias:
        specs.append(_bias(b + "attn_output.bias", n_embd))
    return specs


def _ffn(b: str, n_embd: int, n_ff: int, kind: str = "") -> list[Spec]:
    """SwiGLU gate/up/down; kind "_shexp" names a shared expert."""
    return [matrix(f"{b}ffn_gate{kind}.weight", n_ff, n_embd), matrix(f"{b}ffn_up{kind}.weight", n_ff, n_embd),
            matrix(f"{b}ffn_down{kind}.weight", n_embd, n_ff)]


def _moe(b: str, n_embd: int, n_ff_exp: int, n_expert: int, *, biases: bool = False) -> list[Spec]:
    """Router and stacked experts (ggml {n_in, n_out, n_expert} = numpy (n_expert, n_out, n_in))."""
    specs = [matrix(b + "ffn_gate_inp.weight", n_expert, n_embd),
             (b + "ffn_gate_exps.weight", (n_expert, n_ff_exp, n_embd), 1.0 / math.sqrt(n_embd)),
             (b + "ffn_up_exps.weight", (n_expert, n_ff_exp, n_embd), 1.0 / math.sqrt(n_embd)),
             (b + "ffn_down_exps.weight", (n_expert, n_embd, n_ff_exp), 1.0 / math.sqrt(n_ff_exp))]
    if biases:
        specs += [_bias(b + "ffn_gate_inp.bias", n_expert),
                  fill(b + "ffn_gate_exps.bias", (n_expert, n_ff_exp), 0.0),
                  fill(b + "ffn_up_exps.bias", (n_expert, n_ff_exp), 0.0),
                  fill(b + "ffn_down_exps.bias", (n_expert, n_embd), 0.0)]
    return specs


def _blk(il: int) -> str:
    return f"blk.{il}."


# ---------------------------------------------------------------------------------------------
# architectures


def _qwen2(*, vl: bool = False) -> tuple[dict, list[Spec]]:
    # Qwen2.5 / Qwen2-VL: q/k/v biases, GQA, NEOX RoPE; the loader sizes attn_output
    # {n_embd, n_embd}, so n_head * head_dim must equal n_embd. (This llama.cpp's qwen2vl loader
    # does not read layer_norm_rms_epsilon: its RMS norms run with eps 0.)
    n_embd, n_layer, n_head, n_head_kv, n_ff = 128, 3, 4, 2, 256
    meta = _hparams(n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv, n_ff=n_ff,
                    n_ctx_train=32768, rope_base=1e6, eps=1e-6)
    if vl:
        # M-RoPE (required key, 4 sections summing to n_rot / 2 = 16): temporal, height, width;
        # Qwen2-VL's [16, 24, 24, 0] of 64 scaled to head_dim 32.
        meta[".rope.dimension_sections"] = [4, 6, 6, 0]
    blocks = []
    for il in range(n_layer):
        b = _blk(il)
        blocks += _attn(b, n_embd, n_head, n_head_kv, n_embd // n_head, qkv_bias=True)
        blocks += [norm(b + "ffn_norm.weight", n_embd)] + _ffn(b, n_embd, n_ff)
    return meta, _with_io(n_embd, blocks)


def _qwen3(*, moe: bool = False, vl: bool = False) -> tuple[dict, list[Spec]]:
    # Qwen3 / Qwen3-MoE / Qwen3-VL: per-head q/k RMS norms, no biases, and wider attention than the
    # residual stream (Qwen3-0.6B: 16 heads of 128 over n_embd 1024; here 4 of 32 over 64).
    n_embd, n_layer, n_head, n_head_kv, head_dim, n_ff = 64, 3, 4, 2, 32, 192
    n_expert, n_expert_used, n_ff_exp = 4, 2, 64
    meta = _hparams(n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv, n_ff=n_ff,
                    n_ctx_train=262144 if vl else 40960, rope_base=5e6 if vl else 1e6, eps=1e-6,
                    head_dim=head_dim)
    if moe:
        # Qwen3-30B-A3B routes 8 of 128 experts of 768 (softmax, renormalized top-k; no shared
        # expert); the expert width is its own key, feed_forward_length is not used.
        meta.update({".expert_count": n_expert, ".expert_used_count": n_expert_used,
                     ".expert_feed_forward_length": n_ff_exp})
    if vl:
        # Interleaved M-RoPE (IMROPE): Qwen3-VL's [24, 20, 20, 0] of 64 scaled to 16 = n_rot / 2.
        # Deepstack (vision features added to the first k layers' outputs) is off: with k > 0 the
        # model's input embedding is n_embd * (1 + k) wide, which only an mmproj fills.
        meta[".rope.dimension_sections"] = [6, 5, 5, 0]
        meta[".n_deepstack_layers"] = 0
    blocks = []
    for il in range(n_layer):
        b = _blk(il)
        blocks += _attn(b, n_embd, n_head, n_head_kv, head_dim, qk_norm=True)
        blocks.append(norm(b + "ffn_norm.weight", n_embd))
        blocks += _moe(b, n_embd, n_ff_exp, n_expert) if moe else _ffn(b, n_embd, n_ff)
    return meta, _with_io(n_embd, blocks)


def _phi3() -> tuple[dict, list[Spec]]:
    # Phi-3-mini: full multi-head attention (no GQA) through one fused attn_qkv, and one fused
    # ffn_up of 2 * n_ff (gate and up halves of the SwiGLU); NEOX RoPE, 4k context. Its GGUFs'
    # sliding_window (2047) is left out: llama.cpp ignores it for phi3.
    n_embd, n_layer, n_head, n_ff = 128, 3, 4, 256
    meta = _hparams(n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head, n_ff=n_ff,
                    n_ctx_train=4096, rope_base=10000.0, eps=1e-5)
    blocks = []
    for il in range(n_layer):
        b = _blk(il)
        blocks += _attn(b, n_embd, n_head, n_head, n_embd // n_head, fused=True)
        blocks += [norm(b + "ffn_norm.weight", n_embd), matrix(b + "ffn_up.weight", 2 * n_ff, n_embd),
                   matrix(b + "ffn_down.weight", n_embd, n_ff)]
    return meta, _with_io(n_embd, blocks)


def _mistral3() -> tuple[dict, list[Spec]]:
    # Ministral 3 (llama.cpp's mistral3): a llama block with NORM RoPE, GQA 4:1 and heads wider than
    # n_embd / n_head (3B: 32 x 128 over 3072), YaRN x16 from 16k to 256k, and Llama-4 attention
    # temperature scaling (attention.temperature_scale = llama_4_scaling_beta; llama.cpp floors
    # positions by the YaRN original context, so it is 1 below 16k).
    n_embd, n_layer, n_head, n_head_kv, head_dim, n_ff = 96, 3, 4, 1, 32, 256
    meta = _hparams(n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv, n_ff=n_ff,
                    n_ctx_train=262144, rope_base=1e6, eps=1e-5, head_dim=head_dim)
    meta.update(_yarn(16.0, 16384, yarn_beta_fast=32.0, yarn_beta_slow=1.0, yarn_log_multiplier=1.0))
    meta[".attention.temperature_scale"] = 0.1
    blocks = []
    for il in range(n_layer):
        b = _blk(il)
        blocks += _attn(b, n_embd, n_head, n_head_kv, head_dim)
        blocks += [norm(b + "ffn_norm.weight", n_embd)] + _ffn(b, n_embd, n_ff)
    return meta, _with_io(n_embd, blocks)


def _deepseek2() -> tuple[dict, list[Spec]]:
    # DeepSeek-V3 (llama.cpp's deepseek2) with multi-head latent attention as current GGUFs store
    # it: the KV cache holds one "head" per token, the compressed kv (kv_lora_rank) plus the shared
    # RoPE part of k (n_rot), so head_count_kv = 1, key_length = kv_lora_rank + n_rot and
    # value_length = kv_lora_rank; key_length_mla / value_length_mla are the decompressed per-head
    # sizes (nope + rope, v), and their presence makes the loader ask for the split attn_k_b /
    # attn_v_b. q goes through a low-rank q_a -> norm -> q_b (q_lora_rank is required unless the
    # layer count is a "lite" model's). FFN: one leading dense layer, then MoE with a shared
    # expert, sigmoid routing with a selection bias (exp_probs_b), renormalized and scaled top-k.
    n_embd, n_layer, n_head, n_ff, n_dense = 64, 3, 4, 128, 1
    q_lora, kv_lora, n_rot, nope, v_dim = 64, 32, 16, 32, 32
    n_expert, n_expert_used, n_shared, n_ff_exp = 4, 2, 1, 32
    meta = _hparams(n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=1, n_ff=n_ff,
                    n_ctx_train=163840, rope_base=10000.0, eps=1e-6)
    meta.update({
        ".attention.key_length": kv_lora + n_rot, ".attention.value_length": kv_lora,
        ".attention.key_length_mla": nope + n_rot, ".attention.value_length_mla": v_dim,
        ".attention.q_lora_rank": q_lora, ".attention.kv_lora_rank": kv_lora,
        ".rope.dimension_count": n_rot,
        ".leading_dense_block_count": n_dense,
        ".expert_count": n_expert, ".expert_used_count": n_expert_used,
        ".expert_shared_count": n_shared, ".expert_feed_forward_length": n_ff_exp,
        ".expert_weights_scale": 2.5, ".expert_weights_norm": True, ".expert_gating_func": 2,  # sigmoid
    })
    # the converter writes 0.1 * mscale_all_dim (llama.cpp divides it back)
    meta.update(_yarn(40.0, 4096, yarn_beta_fast=32.0, yarn_beta_slow=1.0, yarn_log_multiplier=0.1))
    blocks = []
    for il in range(n_layer):
        b = _blk(il)
        blocks += [
            norm(b + "attn_norm.weight", n_embd),
            matrix(b + "attn_q_a.weight", q_lora, n_embd),
            norm(b + "attn_q_a_norm.weight", q_lora),
            matrix(b + "attn_q_b.weight", n_head * (nope + n_rot), q_lora),
            matrix(b + "attn_kv_a_mqa.weight", kv_lora + n_rot, n_embd),
            norm(b + "attn_kv_a_norm.weight", kv_lora),
            # ggml {nope, kv_lora, n_head}: per head, k_nope's projection transposed (absorbed
            # into q); its fan-in is kv_lora as in the unsplit kv_b
            (b + "attn_k_b.weight", (n_head, kv_lora, nope), 1.0 / math.sqrt(kv_lora)),
            (b + "attn_v_b.weight", (n_head, v_dim, kv_lora), 1.0 / math.sqrt(kv_lora)),
            matrix(b + "attn_output.weight", n_embd, n_head * v_dim),
            norm(b + "ffn_norm.weight", n_embd),
        ]
        if il < n_dense:
            blocks += _ffn(b, n_embd, n_ff)
        else:
            blocks += _moe(b, n_embd, n_ff_exp, n_expert) + _ffn(b, n_embd, n_ff_exp * n_shared, "_shexp")
            blocks.append(_bias(b + "exp_probs_b.bias", n_expert))
    return meta, _with_io(n_embd, blocks)


def _gpt_oss() -> tuple[dict, list[Spec]]:
    # gpt-oss (llama.cpp's openai_moe): attention sinks (one learned logit per head), biases on
    # q/k/v/output, heads wider than n_embd / n_head (the loader sizes them by n_rot, which
    # defaults to key_length), sliding window 128 on every other layer (llama.cpp's default
    # pattern 2 when the file has none: layers 0 and 2 slide, 1 and 3 are full), YaRN x32 from 4k,
    # and MoE with router and expert biases, softmax over the chosen experts' logits and a clamped
    # SwiGLU. The norm before the MoE is post_attention_norm; there is no ffn_norm. The output
    # matrix is required.
    n_embd, n_layer, n_head, n_head_kv, head_dim = 64, 4, 4, 2, 32
    n_expert, n_expert_used, n_ff_exp = 4, 2, 64
    meta = _hparams(n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv, n_ff=n_ff_exp,
                    n_ctx_train=131072, rope_base=150000.0, eps=1e-5, head_dim=head_dim)
    meta.update({".attention.sliding_window": 128, ".expert_count": n_expert,
                 ".expert_used_count": n_expert_used, ".expert_feed_forward_length": n_ff_exp})
    meta.update(_yarn(32.0, 4096))
    blocks = []
    for il in range(n_layer):
        b = _blk(il)
        blocks += _attn(b, n_embd, n_head, n_head_kv, head_dim, qkv_bias=True, out_bias=True)
        blocks += [(b + "attn_sinks.weight", (n_head,), 1.0), norm(b + "post_attention_norm.weight", n_embd)]
        blocks += _moe(b, n_embd, n_ff_exp, n_expert, biases=True)
    return meta, _with_io(n_embd, blocks)


_BUILDERS = {
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "qwen3moe": lambda: _qwen3(moe=True),
    "phi3": _phi3,
    "mistral3": _mistral3,
    "deepseek2": _deepseek2,
    "gpt-oss": _gpt_oss,
    "qwen2vl": lambda: _qwen2(vl=True),
    "qwen3vl": lambda: _qwen3(vl=True),
}

#: The architectures `build` knows, as llama.cpp names them in general.architecture.
ARCHS: tuple[str, ...] = tuple(_BUILDERS)


def build(arch: str) -> tuple[dict, list[Spec], int]:
    """(metadata, specs, n_vocab) of a tiny random model of `arch` (one of `ARCHS`)."""
    if arch not in _BUILDERS:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    meta, specs = _BUILDERS[arch]()
    return meta, specs, N_VOCAB
