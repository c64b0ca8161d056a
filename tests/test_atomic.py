"""Atomic output: complete file or previous file, never a partial one; ordinary permissions."""
from __future__ import annotations

import errno
import os
import stat

import pytest

from streamnn.atomic import atomic_output, atomic_write, write_error


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


def test_a_symlink_planted_at_the_temporary_name_is_never_followed_or_renamed(tmp_path):
    from streamnn import StreamnnError

    victim, target = tmp_path / "victim", tmp_path / "out.txt"
    victim.write_text("precious")
    target.write_text("old")
    with pytest.raises(StreamnnError, match="replaced by a symlink"):
        with atomic_output(target) as tmp:
            tmp.unlink()
            os.symlink(victim, tmp)  # as another user of the folder might
    assert victim.read_text() == "precious" and target.read_text() == "old"
    assert os.path.islink(tmp)  # not ours: left alone


def test_temporaries_are_created_exclusively_without_following_links(tmp_path, monkeypatch):
    import tempfile

    victim = tmp_path / "victim"
    victim.write_text("precious")
    names = iter(["aaaaaaaa", "bbbbbbbb"])
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: names)
    from streamnn.atomic import _owner_tag

    os.symlink(victim, tmp_path / f".streamnn-tmp-out.txt.{_owner_tag()}aaaaaaaa")  # planted at the first candidate
    atomic_write(tmp_path / "out.txt", b"new")
    assert victim.read_text() == "precious" and (tmp_path / "out.txt").read_bytes() == b"new"


@pytest.mark.parametrize("length", [200, 232, 250, 255])
def test_long_target_names_get_a_temporary_name_that_fits(tmp_path, length):
    target = tmp_path / ("n" * (length - 4) + ".txt")
    atomic_write(target, b"x")
    assert target.read_bytes() == b"x" and os.listdir(tmp_path) == [target.name]
    with pytest.raises(OSError) as err:
        atomic_write(tmp_path / ("n" * 256), b"x")
    assert err.value.errno == errno.ENAMETOOLONG and os.listdir(tmp_path) == [target.name]


def test_hdf5_write_errors_become_os_errors_naming_the_target():
    err = write_error(RuntimeError("Can't decrement id ref count (unable to extend file properly, errno = 27, "
                                   "error message = 'File too large')"), "/x/ckpt.h5")
    assert isinstance(err, OSError) and err.errno == errno.EFBIG and err.filename == "/x/ckpt.h5"
    assert "x/ckpt.h5" in str(write_error(RuntimeError("no number"), "/x/ckpt.h5"))
