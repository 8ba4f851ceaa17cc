"""Tiny random-weight vision projectors (mmproj GGUFs) that libmtmd loads: a CLIP-style ViT with a
LLaVA MLP projector (``clip.projector_type = "mlp"``) or Gemma 3's (``"gemma3"``), and a Qwen2-VL
ViT with its patch merger (``"qwen2vl_merger"``), whose image tokens take M-RoPE positions.

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

The Qwen2-VL projector (`write_qwen2vl_mmproj`, ``models/qwen2vl.cpp``) keeps each image's aspect
ratio instead: libmtmd resizes it to multiples of ``2 * patch_size`` (`qwen2vl_grid`), and the ViT
(2-D M-RoPE inside, no position embedding) ends in a merger that concatenates each 2 x 2 block of
patches and projects it, so an image gives ``nx * ny`` tokens on a grid of ``nx`` x ``ny``. Paired
with a text model whose RoPE is M-RoPE (Qwen2-VL), libmtmd places those tokens by (row, column)
and the image advances the position by ``max(nx, ny)``, not by its token count.

The weights carry no knowledge: the projector exists so that the mechanics of images in a
bounded KV cache (encoding, decoding embeddings, scores, eviction, memory) can be tested on the
default text model without downloading a vision-language model. ``out_std`` sets the spread of
the output embeddings (SmolLM2-135M's token embeddings have a std of about 0.1).

Example: ``python -m infmllm_gguf.synthetic_mmproj /tmp/mmproj.gguf --n-embd 576``.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

__all__ = ["write_mmproj", "write_qwen2vl_mmproj", "n_image_tokens", "qwen2vl_grid"]

#: the merger's side: clip.cpp's Qwen2-VL graph and token counts hard-code 2 x 2 patches per token
_QWEN2VL_MERGE = 2
#: the tokens per image libmtmd resizes Qwen2-VL images to stay within (clip.cpp's
#: ``set_limit_image_tokens(8, 4096)``, unless the mtmd context sets image_min/max_tokens)
_QWEN2VL_TOKENS = (8, 4096)


def n_image_tokens(image_size: int, patch_size: int, merge: int = 1) -> int:
    """Tokens per image: one per patch (no class token), or per `merge` x `merge` patches (gemma3)."""
    return (image_size // patch_size // merge) ** 2


def qwen2vl_grid(width: int, height: int, patch_size: int = 14) -> tuple[int, int]:
    """The (nx, ny) token grid of a `width` x `height` image under the Qwen2-VL projector: libmtmd's
    "smart resize" (``calc_size_preserved_ratio`` in ``mtmd-image.cpp``) rounds each side to a
    multiple of ``2 * patch_size``, then scales the image up or down, keeping its aspect ratio, into
    8..4096 tokens; each token is 2 x 2 patches. (libmtmd computes in float32: a side that lands
    within rounding of a multiple may round the other way there.)"""
    align = patch_size * _QWEN2VL_MERGE
    min_pixels, max_pixels = (n * align * align for n in _QWEN2VL_TOKENS)
    w, h = (max(align, math.floor(x / align + 0.5) * align) for x in (width, height))
    if w * h > max_pixels:
        beta = math.sqrt(width * height / max_pixels)
        w, h = (max(align, math.floor(x / beta / align) * align) for x in (width, height))
    elif w * h < min_pixels:
        beta = math.sqrt(min_pixels / (width * height))
        w, h = (math.ceil(x * beta / align) * align for x in (width, height))
    return w // align, h // align


def _check_vit(vision_embd: int, n_head: int, n_ff: int) -> None:
    """The ViT shapes libmtmd can run."""
    if vision_embd % n_head:
        raise ValueError(f"vision_embd ({vision_embd}) must be a multiple of n_head ({n_head})")
    if n_ff == vision_embd:
        # clip.cpp swaps ffn up/down of the projectors whose ffn_down has ne[0] == n_embd (old exports)
        raise ValueError("n_ff must differ from vision_embd")


def _start(path: str | Path, projector: str):
    """A GGUF writer for an f32 projector of type `projector` (``clip.projector_type``), its
    parent directory made."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(path, "clip")  # general.architecture of every mmproj
    w.add_name("synthetic-mmproj")
    w.add_file_type(0)  # all f32
    w.add_bool("clip.has_vision_encoder", True)  # loads the vision tower (there is no audio one)
    w.add_string("clip.projector_type", projector)  # picks the graph, preprocessor and tensors
    return w


def _add_vision_hparams(w, *, n_embd: int, vision_embd: int, n_head: int, n_ff: int, n_layer: int,
                        image_size: int, patch_size: int) -> None:
    """The ``clip.vision.*`` keys that ``load_hparams`` requires of every projector."""
    w.add_uint32("clip.vision.embedding_length", vision_embd)
    w.add_uint32("clip.vision.attention.head_count", n_head)
    w.add_uint32("clip.vision.feed_forward_length", n_ff)
    w.add_uint32("clip.vision.block_count", n_layer)
    w.add_uint32("clip.vision.projection_dim", n_embd)  # checked against the text model's n_embd
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    w.add_uint32("clip.vision.image_size", image_size)
    w.add_uint32("clip.vision.patch_size", patch_size)
    w.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])  # at least 3 values each
    w.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])


def _finish(w, path: str | Path) -> Path:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


class _Weights:
    """Adds random f32 tensors to a GGUF writer, drawn in call order from one seeded generator.
    Matrices are normal with std 1/sqrt(fan_in) unless told; norms are 1 with bias 0."""

    def __init__(self, w, seed: int):
        self.w = w
        self.rng = np.random.default_rng(seed)

    def normal(self, name: str, std: float, shape: tuple[int, ...]) -> None:
        self.w.add_tensor(name, self.rng.normal(0, std, shape).astype(np.float32))

    def dense(self, name: str, n_out: int, n_in: int, std: float | None = None) -> None:
        # numpy (n_out, n_in) is ggml {ne0 = n_in, ne1 = n_out}: y = W x
        self.normal(name + ".weight", std or n_in ** -0.5, (n_out, n_in))
        self.w.add_tensor(name + ".bias", np.zeros(n_out, dtype=np.float32))

    def norm(self, name: str, n: int) -> None:
        self.w.add_tensor(name + ".weight", np.ones(n, dtype=np.float32))
        self.w.add_tensor(name + ".bias", np.zeros(n, dtype=np.float32))

    def patch_kernel(self, name: str, vision_embd: int, patch_size: int, scale: float = 1.0) -> None:
        # a conv kernel of stride patch_size over RGB: ggml {patch, patch, 3, vision_embd}
        self.normal(name, scale * (3 * patch_size * patch_size) ** -0.5, (vision_embd, 3, patch_size, patch_size))

    def vit_blocks(self, n_layer: int, vision_embd: int, n_ff: int) -> None:
        """Pre-norm ViT blocks: ``v.blk.N.`` ln1, attn_q/k/v/out, ln2, ffn_up/down, all with
        biases (LayerNorm and a plain MLP in both the LLaVA and the Qwen2-VL graphs)."""
        for il in range(n_layer):
            b = f"v.blk.{il}."
            self.norm(b + "ln1", vision_embd)
            for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
                self.dense(b + name, vision_embd, vision_embd)
            self.norm(b + "ln2", vision_embd)
            self.dense(b + "ffn_up", n_ff, vision_embd)
            self.dense(b + "ffn_down", vision_embd, n_ff)

    def gelu_mlp(self, n_in: int, n_hidden: int, n_out: int, out_std: float) -> None:
        """The projector ``mm.0`` -> GELU -> ``mm.2`` (LLaVA's, and Qwen2-VL's merger)."""
        self.dense("mm.0", n_hidden, n_in)
        # GELU of a unit normal has a std of about 0.6: scale so the output std is about out_std
        self.dense("mm.2", n_out, n_hidden, std=out_std / 0.6 * n_hidden ** -0.5)


def write_mmproj(path: str | Path, n_embd: int, *, projector: str = "mlp", image_size: int = 32, patch_size: int = 8,
                 merge: int = 2, vision_embd: int = 64, n_head: int = 4, n_ff: int = 128, n_layer: int = 2,
                 proj_hidden: int = 128, out_std: float = 0.1, seed: int = 0) -> Path:
    """Write the projector ("mlp" or "gemma3", which pools `merge` x `merge` patches); its output
    size is `n_embd` (the text model's). Returns the path."""
    if projector not in ("mlp", "gemma3"):
        raise ValueError(f"projector must be 'mlp' or 'gemma3', not {projector!r}")
    if image_size % patch_size or (projector == "gemma3" and (image_size // patch_size) % merge):
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})"
                         + (f" times merge ({merge})" if projector == "gemma3" else ""))
    _check_vit(vision_embd, n_head, n_ff)
    if n_layer < 2:
        raise ValueError("n_layer must be at least 2 (LLaVA reads the penultimate layer)")

    w = _start(path, projector)
    if projector == "gemma3":
        w.add_uint32("clip.vision.projector.scale_factor", merge)
    w.add_bool("clip.use_gelu", True)
    _add_vision_hparams(w, n_embd=n_embd, vision_embd=vision_embd, n_head=n_head, n_ff=n_ff, n_layer=n_layer,
                        image_size=image_size, patch_size=patch_size)

    t = _Weights(w, seed)
    t.patch_kernel("v.patch_embd.weight", vision_embd, patch_size)
    t.normal("v.position_embd.weight", 0.1, (n_image_tokens(image_size, patch_size), vision_embd))
    t.norm("v.pre_ln", vision_embd)
    t.vit_blocks(n_layer, vision_embd, n_ff)
    t.norm("v.post_ln", vision_embd)
    if projector == "mlp":
        t.gelu_mlp(vision_embd, proj_hidden, n_embd, out_std)
    else:
        w.add_tensor("mm.soft_emb_norm.weight", np.ones(vision_embd, dtype=np.float32))
        # ggml {n_embd, vision_embd}: the graph multiplies by its transpose
        t.normal("mm.input_projection.weight", out_std * vision_embd ** -0.5, (vision_embd, n_embd))
    return _finish(w, path)


def write_qwen2vl_mmproj(path: str | Path, n_embd: int, *, patch_size: int = 14, vision_embd: int = 64,
                         n_head: int = 4, n_ff: int = 128, n_layer: int = 2, out_std: float = 0.1,
                         seed: int = 0) -> Path:
    """Write a Qwen2-VL projector (``qwen2vl_merger``): a ViT of `n_layer` blocks over patches of
    `patch_size` pixels whose merger turns each 2 x 2 patches into one token of `n_embd` values (the
    text model's). libmtmd uses M-RoPE positions for its images when the text model's RoPE is
    M-RoPE. Returns the path.

    Qwen2-VL rather than Qwen2.5-VL: the 2.5 projector must also declare a window-attention
    pattern, and the decoder positions are the same for both."""
    _check_vit(vision_embd, n_head, n_ff)
    if (vision_embd // n_head) % 4:
        # the ViT's 2-D M-RoPE splits each head into 4 sections of head_dim / 4
        raise ValueError(f"the head size vision_embd / n_head ({vision_embd // n_head}) must be a multiple of 4")

    w = _start(path, "qwen2vl_merger")
    # neither clip.use_gelu nor clip.use_silu: the ViT's MLP uses quick GELU, as Qwen2-VL's does
    # (image_size is required but unused: the preprocessor sizes each image; the converter writes 560)
    _add_vision_hparams(w, n_embd=n_embd, vision_embd=vision_embd, n_head=n_head, n_ff=n_ff, n_layer=n_layer,
                        image_size=560, patch_size=patch_size)
    w.add_uint32("clip.vision.spatial_merge_size", _QWEN2VL_MERGE)  # optional (default 2); only 2 works
    # no clip.vision.n_wa_pattern: no window attention (Qwen2.5-VL's)

    t = _Weights(w, seed)
    # the graph always adds two convs (Qwen2-VL's temporal patch of 2 frames, split; a still image
    # goes through both) and asserts there is no patch bias; each half gets half the variance
    for name in ("v.patch_embd.weight", "v.patch_embd.weight.1"):
        t.patch_kernel(name, vision_embd, patch_size, scale=0.5 ** 0.5)
    # no position embedding (the ViT rotates q and k by (row, column)) and no pre_ln
    t.vit_blocks(n_layer, vision_embd, n_ff)
    t.norm("v.post_ln", vision_embd)  # the merger's ln_q
    # the merger's MLP reads 2 x 2 patches concatenated; Qwen2-VL's hidden width is that input's
    t.gelu_mlp(4 * vision_embd, 4 * vision_embd, n_embd, out_std)
    return _finish(w, path)


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
