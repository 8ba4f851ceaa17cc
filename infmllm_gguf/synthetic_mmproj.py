"""A tiny random-weight vision projector (mmproj) GGUF that libmtmd loads: a CLIP-style ViT
with a LLaVA MLP projector (``clip.projector_type = "mlp"``), or Gemma 3's (``"gemma3"``).

The keys and tensor names are those that ``tools/mtmd/clip.cpp`` (``clip_model_loader``,
``load_hparams``, ``load_tensors``; names in ``clip-impl.h``) reads in the llama.cpp vendored by
llama-cpp-python 0.3.36. The graph it runs (``models/llava.cpp``): patch embedding (a conv of
stride ``patch_size``), position embedding, ``pre_ln``, the first ``block_count - 1`` ViT
blocks (LLaVA reads the penultimate layer), ``post_ln``, then ``mm.0`` -> GELU -> ``mm.2``.
An image is resized to ``image_size`` squared and gives ``(image_size / patch_size) ** 2``
tokens of ``projection_dim`` values, which must equal the text model's ``n_embd``. The Gemma 3
projector (``models/siglip.cpp``) runs every block, average-pools ``merge`` x ``merge`` patches,
then RMS-norms (``mm.soft_emb_norm``) and projects (``mm.input_projection``); libmtmd wraps its
images in ``<start_of_image>`` / ``<end_of_image>`` text and decodes them with non-causal attention.

The weights carry no knowledge: the projector exists so that the mechanics of images in a
bounded KV cache (encoding, decoding embeddings, scores, eviction, memory) can be tested on the
default text model without downloading a vision-language model. ``out_std`` sets the spread of
the output embeddings (SmolLM2-135M's token embeddings have a std of about 0.1).

Example: ``python -m infmllm_gguf.synthetic_mmproj /tmp/mmproj.gguf --n-embd 576``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

__all__ = ["write_mmproj", "n_image_tokens"]


def n_image_tokens(image_size: int, patch_size: int, merge: int = 1) -> int:
    """Tokens per image: one per patch (no class token), or per `merge` x `merge` patches (gemma3)."""
    return (image_size // patch_size // merge) ** 2


def write_mmproj(path: str | Path, n_embd: int, *, projector: str = "mlp", image_size: int = 32, patch_size: int = 8,
                 merge: int = 2, vision_embd: int = 64, n_head: int = 4, n_ff: int = 128, n_layer: int = 2,
                 proj_hidden: int = 128, out_std: float = 0.1, seed: int = 0) -> Path:
    """Write the projector ("mlp" or "gemma3", which pools `merge` x `merge` patches); its output
    size is `n_embd` (the text model's). Returns the path."""
    import gguf

    if projector not in ("mlp", "gemma3"):
        raise ValueError(f"projector must be 'mlp' or 'gemma3', not {projector!r}")
    if image_size % patch_size or (projector == "gemma3" and (image_size // patch_size) % merge):
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})"
                         + (f" times merge ({merge})" if projector == "gemma3" else ""))
    if vision_embd % n_head:
        raise ValueError(f"vision_embd ({vision_embd}) must be a multiple of n_head ({n_head})")
    if n_ff == vision_embd:
        # clip.cpp swaps ffn up/down of MLP projectors whose ffn_down has ne[0] == n_embd (old exports)
        raise ValueError("n_ff must differ from vision_embd")
    if n_layer < 2:
        raise ValueError("n_layer must be at least 2 (LLaVA reads the penultimate layer)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_pos = n_image_tokens(image_size, patch_size)

    w = gguf.GGUFWriter(path, "clip")
    w.add_name("synthetic-mmproj")
    w.add_file_type(0)  # all f32
    w.add_bool("clip.has_vision_encoder", True)
    w.add_string("clip.projector_type", projector)
    if projector == "gemma3":
        w.add_uint32("clip.vision.projector.scale_factor", merge)
    w.add_bool("clip.use_gelu", True)
    w.add_uint32("clip.vision.embedding_length", vision_embd)
    w.add_uint32("clip.vision.attention.head_count", n_head)
    w.add_uint32("clip.vision.feed_forward_length", n_ff)
    w.add_uint32("clip.vision.block_count", n_layer)
    w.add_uint32("clip.vision.projection_dim", n_embd)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    w.add_uint32("clip.vision.image_size", image_size)
    w.add_uint32("clip.vision.patch_size", patch_size)
    w.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    w.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])

    def dense(name: str, n_out: int, n_in: int, std: float | None = None) -> None:
        # numpy (n_out, n_in) is ggml {ne0 = n_in, ne1 = n_out}: y = W x
        w.add_tensor(name + ".weight", rng.normal(0, std or n_in ** -0.5, (n_out, n_in)).astype(np.float32))
        w.add_tensor(name + ".bias", np.zeros(n_out, dtype=np.float32))

    def norm(name: str, n: int) -> None:
        w.add_tensor(name + ".weight", np.ones(n, dtype=np.float32))
        w.add_tensor(name + ".bias", np.zeros(n, dtype=np.float32))

    fan_in = 3 * patch_size * patch_size
    # conv kernel: ggml {patch, patch, 3, vision_embd}
    w.add_tensor("v.patch_embd.weight",
                 rng.normal(0, fan_in ** -0.5, (vision_embd, 3, patch_size, patch_size)).astype(np.float32))
    w.add_tensor("v.position_embd.weight", rng.normal(0, 0.1, (n_pos, vision_embd)).astype(np.float32))
    norm("v.pre_ln", vision_embd)
    for il in range(n_layer):
        b = f"v.blk.{il}."
        norm(b + "ln1", vision_embd)
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            dense(b + name, vision_embd, vision_embd)
        norm(b + "ln2", vision_embd)
        dense(b + "ffn_up", n_ff, vision_embd)
        dense(b + "ffn_down", vision_embd, n_ff)
    norm("v.post_ln", vision_embd)
    if projector == "mlp":
        dense("mm.0", proj_hidden, vision_embd)
        # GELU of a unit normal has a std of about 0.6: scale so the output std is about out_std
        dense("mm.2", n_embd, proj_hidden, std=out_std / 0.6 * proj_hidden ** -0.5)
    else:
        w.add_tensor("mm.soft_emb_norm.weight", np.ones(vision_embd, dtype=np.float32))
        # ggml {n_embd, vision_embd}: the graph multiplies by its transpose
        w.add_tensor("mm.input_projection.weight",
                     rng.normal(0, out_std * vision_embd ** -0.5, (vision_embd, n_embd)).astype(np.float32))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infmllm_gguf.synthetic_mmproj",
                                description="Write a tiny random-weight LLaVA-style mmproj GGUF.")
    p.add_argument("out")
    p.add_argument("--n-embd", type=int, default=576, help="the text model's embedding size (SmolLM2-135M: 576)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    path = write_mmproj(a.out, a.n_embd, image_size=a.image_size, patch_size=a.patch_size, seed=a.seed)
    print(f"{path}: {n_image_tokens(a.image_size, a.patch_size)} tokens per image of {a.n_embd} values")
    return 0


if __name__ == "__main__":
    sys.exit(main())
