"""Atomic output: complete file or previous file, never a partial one; ordinary permissions."""
from __future__ import annotations

import os
import stat

import pytest

from streamnn.atomic import atomic_output


def test_success_renames_into_place_with_umask_permissions(tmp_path):
    target = tmp_path / "out.txt"
    with atomic_output(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_text("new")
        assert not target.exists()
    umask = os.umask(0)
    os.umask(umask)
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert os.listdir(tmp_path) == ["out.txt"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failure_keeps_previous_file_and_leaves_no_temporary(tmp_path, exc):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(exc):
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            raise exc()
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]
