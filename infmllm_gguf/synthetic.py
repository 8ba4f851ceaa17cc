"""Random-weight GGUF models in the shapes of real ones.

The files are written with ``gguf.GGUFWriter`` and load and run in llama.cpp (the version
vendored in llama-cpp-python 0.3.36): the metadata keys, tensor names and tensor shapes are
those the ``llama`` and ``gemma3`` architectures of llama.cpp ask for, and a SentencePiece-style
("llama") tokenizer is embedded so that ASCII text tokenizes. Nothing is downloaded.

The weights carry no knowledge; they exist so that memory use, speed and the mechanics of
attention (sliding windows, KV-cache handling, attention-score capture) can be exercised on
models of realistic size without fetching one.

Weights::

    matrices        normal, std 1/sqrt(fan_in) (0.022 for n_embd 2048, 0.016 for 4096),
                    so that q.k/sqrt(head_dim) has std ~1: attention is neither uniform nor
                    one-hot (flatter than a trained model's, with no attention sink), and
                    activations stay finite through any number of layers;
    token_embd      std 1 when untied (llama: the token identity dominates the residual
                    stream), 1/sqrt(n_embd) when tied to the output (gemma3, whose input is
                    scaled by sqrt(n_embd) and whose logits use the same matrix);
    norms (1-D)     1.0, always f32 (gemma3's stored norm weights are 1 + w, so 1.0 is the
                    identity there too).

Speed: values are drawn as random 16-bit indices into a table of 65536 normal quantiles (raw
bit-generator output and ``np.take``, in cache-sized chunks), and q8_0/q4_0 blocks are written
directly (int8 or 4-bit codes drawn from the quantized normal, one f16 scale per block): the
1.1B model writes in q8_0 in ~9 s on one core, where drawing float weights and calling
``gguf.quants.quantize`` would take ~100 s. ``gguf.quants.dequantize`` reads the blocks back
as normal(0, std) values. Tensors are streamed to the file one at a time, so memory stays at
about the size of the largest tensor.

Example::

    from infmllm_gguf.synthetic import write_model
    path = write_model("/tmp/llama-1b-q8_0.gguf", "llama-1b", dtype="q8_0")

or ``python -m infmllm_gguf.synthetic /tmp/llama-1b-q8_0.gguf --shape llama-1b --dtype q8_0``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import string
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Iterator, Optional, Union

import numpy as np

__all__ = ["ModelShape", "SHAPES", "DTYPES", "add_tokenizer", "cached_model", "write_model", "tokenizer_vocab", "main"]

#: dtypes accepted by :func:`write_model` (1-D tensors are always f32).
DTYPES = ("f32", "f16", "q8_0", "q4_0")

# llama.cpp's default sliding-window pattern for gemma3 (load_swa_pattern(ml, 6)): layer il uses
# the sliding window unless il % 6 == 5.
_GEMMA3_SWA_PATTERN = 6

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
_TT_NORMAL, _TT_UNKNOWN, _TT_CONTROL, _TT_BYTE = 1, 2, 3, 6
_N_SPECIAL = 3  # <unk>, <s>, </s>
_N_FIXED = _N_SPECIAL + 256  # specials and the 256 byte tokens


@dataclass(frozen=True)
class ModelShape:
    """Hyperparameters of a decoder-only transformer, as llama.cpp reads them from a GGUF.

    arch: "llama" (RMSNorm, SwiGLU, RoPE, GQA; separate output matrix) or "gemma3" (adds q/k
    norms, post-attention and post-FFN norms, GELU, input scaled by sqrt(n_embd), output tied
    to token_embd, sliding-window attention on every layer but each 6th).
    head_dim: per-head size; None means n_embd // n_head. gemma3 models use head_dim * n_head
    != n_embd; for llama it must equal n_embd // n_head (llama.cpp requires n_rot == head size).
    sliding_window: gemma3 only; None or 0 gives full attention on every layer.
    rope_freq_base_swa: gemma3 only; RoPE base of the sliding-window layers.
    """

    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx_train: int = 4096
    head_dim: Optional[int] = None
    sliding_window: Optional[int] = None
    rope_freq_base: float = 10000.0
    rope_freq_base_swa: Optional[float] = None
    rms_norm_eps: float = 1e-5
    name: str = "synthetic"

    def __post_init__(self) -> None:
        if self.arch not in ("llama", "gemma3"):
            raise ValueError(f"arch must be 'llama' or 'gemma3', not {self.arch!r}")
        for field in ("n_vocab", "n_embd", "n_layer", "n_head", "n_head_kv", "n_ff", "n_ctx_train"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be positive")
        if self.n_vocab < _N_FIXED + 1:
            raise ValueError(f"n_vocab must be at least {_N_FIXED + 1} (specials, bytes, '▁')")
        if self.n_head % self.n_head_kv:
            raise ValueError("n_head must be a multiple of n_head_kv")
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ValueError("n_embd must be a multiple of n_head when head_dim is not given")
        if self.head_dim is not None and self.head_dim % 2:
            raise ValueError("head_dim must be even (RoPE)")
        if self.arch == "llama":
            if self.head_dim is not None and self.head_dim * self.n_head != self.n_embd:
                raise ValueError("llama: head_dim must equal n_embd // n_head")
            if self.sliding_window or self.rope_freq_base_swa is not None:
                raise ValueError("llama: sliding_window / rope_freq_base_swa are gemma3-only")

    @property
    def n_embd_head(self) -> int:
        """Per-head size of q, k and v."""
        return self.head_dim if self.head_dim is not None else self.n_embd // self.n_head

    @property
    def tied_embeddings(self) -> bool:
        """Whether the output projection reuses token_embd (no output.weight tensor)."""
        return self.arch == "gemma3"

    def is_swa(self, il: int) -> bool:
        """Whether layer il uses the sliding window (llama.cpp's rule for this arch)."""
        if self.arch != "gemma3" or not self.sliding_window:
            return False
        return il % _GEMMA3_SWA_PATTERN < _GEMMA3_SWA_PATTERN - 1

    @property
    def swa_layers(self) -> list[int]:
        """Indices of the sliding-window layers (empty without a sliding window)."""
        return [il for il in range(self.n_layer) if self.is_swa(il)]

    @property
    def n_params(self) -> int:
        """Number of weights written to the GGUF."""
        return sum(int(np.prod(shape)) for _, shape, _ in _tensor_specs(self))


#: Named shapes. The tiny ones are for CPU tests; the others copy real models' hyperparameters.
SHAPES: dict[str, ModelShape] = {
    "tiny-llama": ModelShape(
        arch="llama", n_vocab=512, n_embd=64, n_layer=3, n_head=4, n_head_kv=2, n_ff=128,
        n_ctx_train=2048, name="tiny-llama"),
    # 8 layers: 0-4 and 6-7 use the 32-token window, layer 5 is full attention.
    "tiny-gemma3-swa": ModelShape(
        arch="gemma3", n_vocab=512, n_embd=64, n_layer=8, n_head=4, n_head_kv=2, n_ff=128,
        n_ctx_train=4096, head_dim=32, sliding_window=32, rope_freq_base=1_000_000.0,
        rope_freq_base_swa=10_000.0, rms_norm_eps=1e-6, name="tiny-gemma3-swa"),
    # TinyLlama-1.1B
    "llama-1b": ModelShape(
        arch="llama", n_vocab=32000, n_embd=2048, n_layer=22, n_head=32, n_head_kv=4, n_ff=5632,
        n_ctx_train=2048, name="llama-1b"),
    # Llama-2-7B
    "llama-7b": ModelShape(
        arch="llama", n_vocab=32000, n_embd=4096, n_layer=32, n_head=32, n_head_kv=32, n_ff=11008,
        n_ctx_train=4096, name="llama-7b"),
    # Gemma-3-1B (text): 1152 wide, 4 heads of 256, one KV head, 512-token window.
    "gemma3-1b": ModelShape(
        arch="gemma3", n_vocab=262144, n_embd=1152, n_layer=26, n_head=4, n_head_kv=1, n_ff=6912,
        n_ctx_train=32768, head_dim=256, sliding_window=512, rope_freq_base=1_000_000.0,
        rope_freq_base_swa=10_000.0, rms_norm_eps=1e-6, name="gemma3-1b"),
}


# ---------------------------------------------------------------------------------------------
# tokenizer

def _filler_pieces() -> Iterator[str]:
    """SentencePiece-like pieces, shortest first, each reachable by merging shorter ones."""
    yield "▁"
    yield from (chr(c) for c in range(33, 127))  # printable ASCII except space
    for c in string.ascii_letters + string.digits:
        yield "▁" + c
    lower = string.ascii_lowercase
    for n in itertools.count(2):
        for t in itertools.product(lower, repeat=n):
            w = "".join(t)
            yield w
            yield "▁" + w


def tokenizer_vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types of the embedded tokenizer.

    Ids 0, 1, 2 are <unk>, <s>, </s>; 3..258 the byte tokens <0x00>..<0xFF>; then "▁", the
    printable ASCII characters, "▁" + letter/digit, and lowercase letter strings (with and
    without "▁") by increasing length, scored so that earlier pieces merge first. Any ASCII text
    tokenizes (byte fallback covers the rest) and detokenizes back to itself.
    """
    if n_vocab < _N_FIXED + 1:
        raise ValueError(f"n_vocab must be at least {_N_FIXED + 1}")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [_TT_UNKNOWN, _TT_CONTROL, _TT_CONTROL] + [_TT_BYTE] * 256
    pieces = list(itertools.islice(_filler_pieces(), n_vocab - _N_FIXED))
    tokens += pieces
    types += [_TT_NORMAL] * len(pieces)
    scores = [0.0] * _N_FIXED + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


def add_tokenizer(w, n_vocab: int) -> None:
    """Write the embedded tokenizer (`tokenizer_vocab`) to a ``gguf.GGUFWriter``: <s> first, no </s>."""
    tokens, scores, types = tokenizer_vocab(n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


# ---------------------------------------------------------------------------------------------
# tensors

def _tensor_specs(shape: ModelShape) -> list[tuple[str, tuple[int, ...], float]]:
    """(name, numpy shape, std) of every tensor; std 0 marks a norm weight (all ones).

    numpy shape (rows, cols) is ggml's {ne0 = cols, ne1 = rows}: cols is the fan-in.
    """
    s = shape
    hd, e = s.n_embd_head, s.n_embd
    q_out, kv_out = s.n_head * hd, s.n_head_kv * hd
    inv = lambda fan_in: 1.0 / float(np.sqrt(fan_in))  # noqa: E731
    specs: list[tuple[str, tuple[int, ...], float]] = [
        ("token_embd.weight", (s.n_vocab, e), inv(e) if s.tied_embeddings else 1.0)]
    for il in range(s.n_layer):
        b = f"blk.{il}."
        specs += [
            (b + "attn_norm.weight", (e,), 0.0),
            (b + "attn_q.weight", (q_out, e), inv(e)),
            (b + "attn_k.weight", (kv_out, e), inv(e)),
            (b + "attn_v.weight", (kv_out, e), inv(e)),
            (b + "attn_output.weight", (e, q_out), inv(q_out)),
        ]
        if s.arch == "gemma3":
            specs += [
                (b + "attn_q_norm.weight", (hd,), 0.0),
                (b + "attn_k_norm.weight", (hd,), 0.0),
                (b + "post_attention_norm.weight", (e,), 0.0),
            ]
        specs += [
            (b + "ffn_norm.weight", (e,), 0.0),
            (b + "ffn_gate.weight", (s.n_ff, e), inv(e)),
            (b + "ffn_up.weight", (s.n_ff, e), inv(e)),
            (b + "ffn_down.weight", (e, s.n_ff), inv(s.n_ff)),
        ]
        if s.arch == "gemma3":
            specs.append((b + "post_ffw_norm.weight", (e,), 0.0))
    specs.append(("output_norm.weight", (e,), 0.0))
    if not s.tied_embeddings:
        specs.append(("output.weight", (s.n_vocab, e), inv(e)))
    return specs


_TABLES: dict[str, np.ndarray] = {}


def _normal_table() -> np.ndarray:
    """65536 equiprobable normal quantiles, rescaled to mean 0 and std exactly 1 (float64)."""
    t = _TABLES.get("normal")
    if t is None:
        inv_cdf = NormalDist().inv_cdf
        t = np.array([inv_cdf((i + 0.5) / 65536) for i in range(65536)])
        t = (t - t.mean()) / t.std()
        _TABLES["normal"] = t
    return t


# Codes are drawn from a normal with this std (in quantization steps), then rounded and clipped.
_Q8_SIGMA = 127 / 4.5  # clips at 4.5 sigma
_Q4_SIGMA = 2.5  # codes -8..7: clips at ~3 sigma


def _code_tables() -> tuple[np.ndarray, float, np.ndarray, float]:
    """Lookup tables for q8_0 (uint16 -> int8 code as uint8) and q4_0 (uint16 -> byte of two
    4-bit codes), with the std of the dequantized code (in steps) of each."""
    if "q8" not in _TABLES:
        t = _normal_table()
        q8 = np.clip(np.rint(t * _Q8_SIGMA), -127, 127).astype(np.int8)
        _TABLES["q8"] = q8.view(np.uint8)
        _TABLES["q8_std"] = np.array(q8.astype(np.float64).std())
        # one 4-bit code per random byte: 256 equiprobable quantiles of the normal
        t256 = np.array([NormalDist().inv_cdf((i + 0.5) / 256) for i in range(256)])
        nib = np.clip(np.rint(t256 * _Q4_SIGMA), -8, 7).astype(np.int64)  # value; code = value + 8
        _TABLES["q4_std"] = np.array(nib.astype(np.float64).std())
        idx = np.arange(65536)
        _TABLES["q4"] = ((nib[idx & 0xFF] + 8) | ((nib[idx >> 8] + 8) << 4)).astype(np.uint8)
    return _TABLES["q8"], float(_TABLES["q8_std"]), _TABLES["q4"], float(_TABLES["q4_std"])


_CHUNK = 1 << 16  # values per lookup: indices and results stay in cache


def _lookup_fill(table: np.ndarray, out: np.ndarray, rng: np.random.Generator) -> None:
    """out[...] = table[random uint16], chunk by chunk (a whole-tensor np.take would first
    convert all indices to intp: ~4x slower and 8 bytes per value of memory)."""
    flat = out.reshape(-1)
    raw = rng.bit_generator.random_raw  # 64 random bits per call element, the fastest source
    for i in range(0, flat.size, _CHUNK):
        m = min(_CHUNK, flat.size - i)
        idx = raw((m + 3) // 4).view(np.uint16)[:m]
        np.take(table, idx, out=flat[i:i + m])


def _qtype(dtype: str, numpy_shape: tuple[int, ...]):
    """GGML type of a tensor: 1-D tensors are f32; q8_0/q4_0 need rows a multiple of 32
    (otherwise f16, as llama.cpp's own quantizer falls back)."""
    from gguf import GGMLQuantizationType as T

    if len(numpy_shape) == 1 or dtype == "f32":
        return T.F32
    if dtype == "f16":
        return T.F16
    if numpy_shape[-1] % 32:
        return T.F16
    return {"q8_0": T.Q8_0, "q4_0": T.Q4_0}[dtype]


def _nbytes(numpy_shape: tuple[int, ...], qtype) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(numpy_shape)) // block * size


def _make_tensor(numpy_shape: tuple[int, ...], std: float, qtype, rng: np.random.Generator) -> np.ndarray:
    """The bytes/values of one tensor, in the layout GGUFWriter.write_tensor_data expects."""
    from gguf import GGMLQuantizationType as T

    n = int(np.prod(numpy_shape))
    if std == 0.0:  # norm weight
        return np.ones(numpy_shape, dtype=np.float32)
    if qtype in (T.F32, T.F16):
        dt = np.float32 if qtype == T.F32 else np.float16
        key = f"{dt.__name__}:{std!r}"
        table = _TABLES.get(key)
        if table is None:
            table = _TABLES[key] = (_normal_table() * std).astype(dt)
        out = np.empty(numpy_shape, dtype=dt)
        _lookup_fill(table, out, rng)
        return out
    q8, q8_std, q4, q4_std = _code_tables()
    if qtype == T.Q8_0:  # block: f16 scale, 32 int8 codes
        table, n_codes, scale = q8, 32, std / q8_std
    elif qtype == T.Q4_0:  # block: f16 scale, 16 bytes of two 4-bit codes (value = code - 8)
        table, n_codes, scale = q4, 16, std / q4_std
    else:  # pragma: no cover
        raise ValueError(qtype)
    n_blocks = n // 32
    out = np.empty((n_blocks, 2 + n_codes), dtype=np.uint8)
    out[:, :2] = np.frombuffer(np.float16(scale).tobytes(), dtype=np.uint8)
    codes = np.empty((_CHUNK // n_codes, n_codes), dtype=np.uint8)
    for b in range(0, n_blocks, codes.shape[0]):
        c = codes[: min(codes.shape[0], n_blocks - b)]
        _lookup_fill(table, c, rng)
        out[b:b + c.shape[0], 2:] = c
    return out.reshape(numpy_shape[:-1] + (-1,))


# ---------------------------------------------------------------------------------------------
# writer

_FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7}  # gguf.LlamaFileType


def write_model(
    path: Union[str, Path],
    shape: Union[ModelShape, str],
    *,
    dtype: str = "f16",
    seed: int = 0,
) -> Path:
    """Write a random-weight GGUF of the given shape (a ModelShape or a key of SHAPES).

    dtype: "f32", "f16", "q8_0" or "q4_0" for the 2-D tensors (token_embd included); 1-D
    tensors (norms) are f32. The same (shape, dtype, seed) gives the same file, byte for byte.
    Returns the path.
    """
    import gguf

    if isinstance(shape, str):
        if shape not in SHAPES:
            raise KeyError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
        shape = SHAPES[shape]
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, not {dtype!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    s = shape

    w = gguf.GGUFWriter(path, s.arch)
    w.add_name(s.name)
    w.add_type("model")
    w.add_file_type(_FILE_TYPES[dtype])
    if dtype in ("q8_0", "q4_0"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(s.n_ctx_train)
    w.add_embedding_length(s.n_embd)
    w.add_block_count(s.n_layer)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    w.add_layer_norm_rms_eps(s.rms_norm_eps)
    w.add_rope_freq_base(s.rope_freq_base)
    if s.arch == "llama":
        w.add_vocab_size(s.n_vocab)
        w.add_rope_dimension_count(s.n_embd_head)
    else:
        w.add_key_length(s.n_embd_head)
        w.add_value_length(s.n_embd_head)
        if s.sliding_window:
            w.add_sliding_window(s.sliding_window)
            if s.rope_freq_base_swa is not None:
                w.add_rope_freq_base_swa(s.rope_freq_base_swa)

    add_tokenizer(w, s.n_vocab)

    specs = _tensor_specs(s)
    qtypes = [_qtype(dtype, shp) for _, shp, _ in specs]
    for (name, shp, _), qt in zip(specs, qtypes):
        w.add_tensor_info(name, shp, np.dtype(np.float32), _nbytes(shp, qt), raw_dtype=qt)

    # stream: header, metadata, tensor infos, then one tensor at a time
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    try:
        for i, ((_, shp, std), qt) in enumerate(zip(specs, qtypes)):
            rng = np.random.default_rng([seed, i])
            w.write_tensor_data(_make_tensor(shp, std, qt, rng))
        w.flush()
    finally:
        w.close()
    return path


def cached_model(shape: str, dtype: str = "q8_0", directory: Union[str, os.PathLike, None] = None) -> Path:
    """A random-weight model of a named shape, written once into `directory` (default
    `<cache>/synthetic`) and reused: the same shape and dtype give the same bytes."""
    from .model_files import cache_dir

    if shape not in SHAPES:
        raise ValueError(f"unknown synthetic shape {shape!r}: choose one of {', '.join(SHAPES)}")
    directory = Path(directory) if directory is not None else cache_dir() / "synthetic"
    path = directory / f"{shape}-{dtype}.gguf"
    if not path.exists():
        part = path.with_suffix(f".part{os.getpid()}")  # an interrupted write never looks complete
        write_model(part, shape, dtype=dtype)
        part.replace(path)
    return path


# ---------------------------------------------------------------------------------------------
# command line

def main(argv: Optional[list[str]] = None) -> int:
    """``python -m infmllm_gguf.synthetic OUT.gguf --shape llama-1b --dtype q8_0``."""
    p = argparse.ArgumentParser(
        prog="python -m infmllm_gguf.synthetic",
        description="Write a random-weight GGUF model in the shape of a real one.")
    p.add_argument("out", nargs="?", help="output .gguf path")
    p.add_argument("--shape", default="tiny-llama", choices=sorted(SHAPES))
    p.add_argument("--dtype", default="f16", choices=DTYPES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--list", action="store_true", help="list the known shapes and exit")
    a = p.parse_args(argv)
    if a.list:
        for k, v in SHAPES.items():
            fields = ", ".join(f"{f.name}={getattr(v, f.name)}" for f in dataclasses.fields(v)
                               if f.name != "name" and getattr(v, f.name) is not None)
            print(f"{k}: {fields} ({v.n_params / 1e6:.1f}M params)")
        return 0
    if not a.out:
        p.error("the output path is required")
    t0 = time.perf_counter()
    path = write_model(a.out, a.shape, dtype=a.dtype, seed=a.seed)
    dt = time.perf_counter() - t0
    size = path.stat().st_size
    print(f"{path} {size} bytes ({size / 2**20:.1f} MiB), {a.shape} {a.dtype}, {dt:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
