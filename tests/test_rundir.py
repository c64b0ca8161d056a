"""The run folder: run files recognised by content, foreign files never replaced or deleted,
no symlink ever followed, damaged run files a one-line error."""
from __future__ import annotations

import json
import os
import stat

import h5py
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamnn import StreamnnError
from streamnn.run.checkpoint import save_checkpoint
from streamnn.run.folder import (BEST, CONFIG_FORMAT, CONFIG_JSON, CURVES_METADATA, CURVES_PNG, LATEST, LOCK_FILE,
                             METRICS_CSV, METRICS_HEADER, RUN_FILES, STEPS_CSV, RunDir, png_text_chunks)


def _curves(path):
    from streamnn.run.plots import save_curves

    save_curves({"epoch": [1.0], "train_loss": [0.5], "train_accuracy": [0.6]}, path, metadata=CURVES_METADATA)


def make_run_files(folder):
    """Every run file, as a run writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(folder / LATEST, {"a": 1})
    save_checkpoint(folder / BEST, {"a": 1})
    (folder / CONFIG_JSON).write_text(json.dumps({"format": CONFIG_FORMAT, "epochs": 1}))
    (folder / METRICS_CSV).write_text(METRICS_HEADER + "\n1,2,0.1,,,,,,,1\n")
    (folder / STEPS_CSV).write_text("step,epoch,loss\n1,1,0.5\n")
    _curves(folder / CURVES_PNG)
    (folder / LOCK_FILE).write_text("")
    (folder / ".streamnn-tmp-checkpoint-latest.h5.abcdefgh").write_bytes(b"partial")


# What a user may have at a run file's name: their own file of the same kind, or not a file at all.
def _foreign_variants(folder, name):
    path = folder / name
    yield "text", lambda: path.write_text("my own notes\n")
    yield "symlink", lambda: os.symlink(folder / "elsewhere", path)
    yield "folder", lambda: path.mkdir()
    yield "fifo", lambda: os.mkfifo(path)
    if name.endswith(".h5"):
        yield "foreign hdf5", lambda: h5py.File(path, "w").close()
    if name.endswith(".png"):
        yield "own png", lambda: __import__("streamnn.run.plots", fromlist=["x"]).save_curves(
            {"epoch": [1.0], "train_loss": [1.0]}, path)
    if name.endswith(".json"):
        yield "other json", lambda: path.write_text('{"epochs": 3}')
    if name.endswith(".csv"):
        yield "other csv", lambda: path.write_text("a,b\n1,2\n")


def test_every_run_file_is_recognised_by_content(tmp_path):
    make_run_files(tmp_path)
    ours, foreign = RunDir(tmp_path).survey()
    assert foreign == [] and set(ours) == {*RUN_FILES, LOCK_FILE, ".streamnn-tmp-checkpoint-latest.h5.abcdefgh"}
    assert png_text_chunks((tmp_path / CURVES_PNG).read_bytes())["Software"] == CURVES_METADATA["Software"]


@pytest.mark.parametrize("name", [*RUN_FILES, LOCK_FILE])
def test_foreign_entries_at_run_names_are_never_replaced_or_deleted(tmp_path, name):
    for i, kind in enumerate(k for k, _ in _foreign_variants(tmp_path, name)):
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        variants = dict(_foreign_variants(folder, name))
        (folder / "elsewhere").write_text("target")
        variants[kind]()
        run = RunDir(folder)
        assert name in run.survey()[1], kind
        before = os.lstat(folder / name)
        for force in (False, True):
            with pytest.raises(StreamnnError) as err:
                with run.lock():
                    run.prepare_new(force)
            assert str(folder) in str(err.value) and "\n" not in str(err.value), kind
        after = os.lstat(folder / name)
        assert (before.st_ino, before.st_mode) == (after.st_ino, after.st_mode), kind
        assert (folder / "elsewhere").read_text() == "target", kind


def test_force_deletes_only_run_files_and_new_run_refuses_foreign_files(tmp_path):
    make_run_files(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "sub").mkdir()
    run = RunDir(tmp_path)
    with pytest.raises(StreamnnError, match="not from a streamnn run: notes.txt"):
        run.prepare_new(force=False)
    with run.lock():
        run.prepare_new(force=True)
    assert sorted(os.listdir(tmp_path)) == sorted([LOCK_FILE, "notes.txt", "sub"])
    (tmp_path / "notes.txt").unlink()
    (tmp_path / "sub").rmdir()
    save_checkpoint(tmp_path / LATEST, {"a": 1})
    with pytest.raises(StreamnnError, match="already holds a run"):
        run.prepare_new(force=False)
    (tmp_path / LATEST).unlink()
    run.prepare_new(force=False)  # an empty folder, or one with a partial run, is fine


def test_lock_never_follows_a_symlink_and_refuses_other_kinds(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    for i, make in enumerate([lambda p: os.symlink(victim, p), lambda p: p.mkdir(), os.mkfifo,
                              lambda p: p.write_text("not a pid")]):
        folder = tmp_path / f"f{i}"
        folder.mkdir()
        make(folder / LOCK_FILE)
        with pytest.raises(StreamnnError, match="lock file"):
            with RunDir(folder).lock():
                pass
    assert victim.read_text() == "precious"
    with RunDir(tmp_path / "ok").lock():
        assert (tmp_path / "ok" / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    assert (tmp_path / "ok" / LOCK_FILE).read_text() == ""


def test_steps_log_is_cut_back_and_damage_is_one_line(tmp_path):
    run = RunDir(tmp_path)
    (tmp_path / STEPS_CSV).write_text("step,epoch,loss\n1,1,0.5\n2,1,0.4\n3,1,0.3\n4,2,0.")
    with run.steps_log(2) as f:
        f.write("3,1,0.25\n")
    assert (tmp_path / STEPS_CSV).read_text() == "step,epoch,loss\n1,1,0.5\n2,1,0.4\n3,1,0.25\n"
    for damaged in (b"step,epoch,loss\n1,1,\xff0.5\n2,1,0.4\n", b"step,epoch,loss\n1;1;0.5\n2,1,0.4\n"):
        (tmp_path / STEPS_CSV).write_bytes(damaged)
        with pytest.raises(StreamnnError, match=r"steps.csv: line 2 is damaged"):
            run.steps_log(2)
        assert (tmp_path / STEPS_CSV).read_bytes() == damaged  # left as it was
    (tmp_path / STEPS_CSV).unlink()
    (tmp_path / STEPS_CSV).mkdir()
    with pytest.raises(StreamnnError, match="is a folder"):
        run.steps_log(2)


def test_open_append_and_read_never_follow_symlinks(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    os.symlink(victim, tmp_path / STEPS_CSV)
    run = RunDir(tmp_path)
    with pytest.raises(StreamnnError, match="a symlink"):
        run.read_bytes(STEPS_CSV)
    with pytest.raises(OSError):
        run.open_append(STEPS_CSV)
    run.write_text(STEPS_CSV, "step,epoch,loss\n")  # replaces the link itself
    assert victim.read_text() == "precious" and stat.S_ISREG(os.lstat(tmp_path / STEPS_CSV).st_mode)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=64), name=st.sampled_from([*RUN_FILES, LOCK_FILE]))
def test_random_bytes_at_a_run_name_are_foreign_unless_they_are_a_run_file(tmp_path, content, name):
    folder = tmp_path / "f"
    folder.mkdir(exist_ok=True)
    for p in folder.iterdir():
        p.unlink()
    (folder / name).write_bytes(content)
    stripped = content.strip()
    is_lock = name == LOCK_FILE and (stripped == b"" or stripped.isdigit())
    is_steps = name == STEPS_CSV and (content.startswith(b"step,epoch,loss\n") or content == b"step,epoch,loss")
    assert RunDir(folder).is_ours(name) == (is_lock or is_steps)  # 64 bytes cannot hold the other headers


def test_train_cli_never_replaces_a_users_files(tmp_path):
    """The issue's example: a folder holding the user's own config.json, metrics.csv, curves.png."""
    from click.testing import CliRunner

    from streamnn.cli.train import main as train_main
    from tinystore import make_store

    store = make_store(tmp_path / "s.h5")
    out = tmp_path / "mine"
    out.mkdir()
    mine = {CONFIG_JSON: b'{"my": "settings"}', METRICS_CSV: b"a,b\n1,2\n", CURVES_PNG: b"\x89PNG\r\n\x1a\nmine"}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    args = [str(store), "--out", str(out), "--epochs", "1", "--hidden", "4", "-q", "--no-progress"]
    for extra in ([], ["--force"]):
        r = CliRunner().invoke(train_main, [*args, *extra])
        assert r.exit_code == 1 and r.output.startswith(f"Error: {out}: ") and r.output.count("\n") == 1, r.output
        assert "not the file of a streamnn run" in r.output
    assert {name: (out / name).read_bytes() for name in mine} == mine
    (out / "notes.txt").write_text("mine")  # beside a finished run: kept by --force
    for name in mine:
        (out / name).unlink()
    assert CliRunner().invoke(train_main, args).exit_code == 1  # foreign file, no --force
    assert CliRunner().invoke(train_main, [*args, "--force"]).exit_code == 0
    assert CliRunner().invoke(train_main, [*args, "--force"]).exit_code == 0  # our own run: replaced
    assert (out / "notes.txt").read_text() == "mine" and RunDir(out).survey()[1] == ["notes.txt"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from click.testing import CliRunner

    from streamnn.cli.train import main as train_main
    from tinystore import make_store

    folder = tmp_path_factory.mktemp("finished")
    store = make_store(folder / "s.h5")
    args = [str(store), "--out", str(folder / "run"), "--epochs", "1", "--hidden", "4", "--batch-size", "4", "-q",
            "--no-progress"]
    assert CliRunner().invoke(train_main, args).exit_code == 0
    return folder / "run"


@pytest.mark.parametrize("damage", ["steps not utf-8", "steps folder", "lock folder", "lock symlink"])
def test_resume_with_damaged_run_files_is_one_line(finished_run, tmp_path, damage):
    import shutil

    from click.testing import CliRunner

    from streamnn.cli.train import main as train_main

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (tmp_path / "victim").write_text("precious")
    if damage == "steps not utf-8":
        (out / STEPS_CSV).write_bytes(b"step,epoch,loss\n1,1,0.6\n2,1,\xff\n3,1,0.5\n")
    elif damage == "steps folder":
        (out / STEPS_CSV).unlink()
        (out / STEPS_CSV).mkdir()
    else:
        (out / LOCK_FILE).unlink()
        if damage == "lock folder":
            (out / LOCK_FILE).mkdir()
        else:
            os.symlink(tmp_path / "victim", out / LOCK_FILE)
    r = CliRunner().invoke(train_main, ["--resume", "--out", str(out), "--epochs", "2", "-q"])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (r.output, r.exception)
    assert r.output.startswith("Error: ") and r.output.count("\n") == 1 and str(out) in r.output, r.output
    assert (tmp_path / "victim").read_text() == "precious"


def test_curves_drawn_before_the_marker_are_ours_only_beside_our_checkpoint(tmp_path):
    """A run folder of the release before the marker resumes; a lone matplotlib curves.png stays foreign."""
    from streamnn.run.plots import save_curves

    history = {"epoch": [1.0], "train_loss": [0.5], "train_accuracy": [0.6]}
    lone = tmp_path / "lone"
    lone.mkdir()
    save_curves(history, lone / CURVES_PNG)  # matplotlib's own Software chunk, no streamnn marker
    assert png_text_chunks((lone / CURVES_PNG).read_bytes()[:4096])["Software"].startswith("Matplotlib version")
    assert not RunDir(lone).is_ours(CURVES_PNG)
    old = tmp_path / "old"
    old.mkdir()
    save_curves(history, old / CURVES_PNG)
    save_checkpoint(old / LATEST, {"a": 1})
    assert RunDir(old).is_ours(CURVES_PNG)
    (old / LATEST).write_bytes(b"not a checkpoint")
    assert not RunDir(old).is_ours(CURVES_PNG)
