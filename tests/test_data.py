"""The text fetchers' cleaning, without fetching."""
import pytest

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
