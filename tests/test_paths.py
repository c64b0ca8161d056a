"""The one text form of file names: lossless, one printable line, plain names unchanged."""
from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st

from streamnn.paths import path_bytes, path_text


def test_plain_names_are_unchanged():
    for name in ["cats/cat.1.jpg", "chats/été/猫.png", "a b/c-d_e.JPG"]:
        assert path_text(name) == name


def test_undecodable_bytes_control_characters_and_backslashes_are_escaped():
    assert path_text(b"caf\xe9.jpg") == "caf\\xe9.jpg"
    assert path_text(os.fsdecode(b"caf\xe9.jpg")) == "caf\\xe9.jpg"  # as os.listdir gives it
    assert path_text("a\tb\nc\x7f") == "a\\x09b\\x0ac\\x7f"
    assert path_text("back\\slash") == "back\\\\slash"
    assert path_text("literal\\xe9") == "literal\\\\xe9"  # never confused with an escaped byte


@given(st.binary(max_size=40))
def test_reversible_printable_and_encodable(raw):
    text = path_text(raw)
    assert path_bytes(text) == raw
    assert not [c for c in text if ord(c) < 0x20 or ord(c) == 0x7F]  # one line, no tab
    text.encode("utf-8")  # storable in HDF5 / JSON: no lone surrogates


@given(st.binary(max_size=20), st.binary(max_size=20))
def test_different_names_never_share_a_text_form(a, b):
    if a != b:
        assert path_text(a) != path_text(b)


@given(st.text(max_size=30) | st.binary(max_size=30).map(os.fsdecode))
def test_text_names_take_the_fast_path_only_when_nothing_changes(name):
    slow = path_text(os.fsencode(name))  # bytes: always the character loop
    assert path_text(name) == slow
