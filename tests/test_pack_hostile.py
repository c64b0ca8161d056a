"""Packing against hostile input: outputs that are not ours, folder links and loops, names that
are not UTF-8, full and read-only disks, over-long names, bad --classes, huge files, and
signals (no process outlives the run, every SIGINT/SIGTERM ends in 130/143 with nothing written)."""
from __future__ import annotations

import contextlib
import os
import random
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import h5py
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blocking import BLOCKER
from imagetree import encode, make_tree, smooth_image
from streamnn import StreamnnError, open_store
from streamnn.atomic import TMP_PREFIX
from streamnn.cli.pack import main as pack_main
from streamnn.pack import pack, scan_source
from streamnn.pack.output import is_store_file
from streamnn.paths import path_bytes, path_text

PACK_CLI = [sys.executable, "-m", "streamnn.cli.pack"]
# The CLI with every chunk sent to the workers (none decoded in the parent while they start).
POOL_CLI = [sys.executable, "-c", "import sys; from streamnn.pack.pool import Decoder; "
            "Decoder.decode_while_booting = False; from streamnn.cli.pack import main; "
            "sys.argv[0] = 'streamnn-pack'; main()"]


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile") / "src"
    make_tree(root, {"": {"cats": 6, "dogs": 6}}, h=10, w=10)
    return root


@pytest.fixture()
def store(src, tmp_path) -> Path:
    out = tmp_path / "old.h5"
    pack(src, out, size=4, workers=1)
    return out


def run_cli(*args: str | os.PathLike) -> tuple[int, str, str]:
    r = CliRunner().invoke(pack_main, [os.fspath(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


# -- 1. outputs that are not ours ------------------------------------------------------------
def _fifo(p: Path) -> None:
    os.mkfifo(p)


def _folder(p: Path) -> None:
    p.mkdir()


def _link_to_file(p: Path) -> None:
    (p.parent / "target.txt").write_text("mine")
    p.symlink_to(p.parent / "target.txt")


def _link_to_folder(p: Path) -> None:
    (p.parent / "dir").mkdir()
    p.symlink_to(p.parent / "dir")


def _dangling_link(p: Path) -> None:
    p.symlink_to(p.parent / "nowhere")


def _text(p: Path) -> None:
    p.write_text("my notes")


def _hdf5_not_a_store(p: Path) -> None:
    with h5py.File(p, "w") as f:
        f.attrs["format"] = "something-else"
        f["data"] = [1, 2, 3]


@pytest.mark.parametrize("make,why", [
    (_fifo, "not a regular file"), (_folder, "is a folder"), (_link_to_file, "symbolic link"),
    (_link_to_folder, "symbolic link"), (_dangling_link, "symbolic link"),
    (_text, "not a readable streamnn store"), (_hdf5_not_a_store, "not a readable streamnn store"),
])
def test_force_refuses_an_output_that_is_not_a_store(src, tmp_path, make, why):
    out = tmp_path / "out.h5"
    make(out)
    before = sorted((p.name, p.lstat().st_mode, p.lstat().st_size) for p in tmp_path.iterdir())
    code, _, err = run_cli(src, "-o", out, "--force", "--workers", "1")
    assert code == 1 and err.startswith("Error: ") and why in err and err.count("\n") == 1, err
    assert path_text(out) in err and "Traceback" not in err
    assert sorted((p.name, p.lstat().st_mode, p.lstat().st_size) for p in tmp_path.iterdir()) == before


def test_a_device_is_never_replaced(src):
    code, _, err = run_cli(src, "-o", "/dev/null", "--force")
    assert code == 1 and "not a regular file" in err
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_a_damaged_store_is_not_replaced_even_with_force(src, store):
    data = store.read_bytes()
    store.write_bytes(data[: len(data) // 3])
    assert not is_store_file(store)
    with pytest.raises(StreamnnError, match="not a readable streamnn store"):
        pack(src, store, size=4, workers=1, force=True)
    assert store.read_bytes() == data[: len(data) // 3]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=2000), prefix=st.sampled_from([b"", b"\x89HDF\r\n\x1a\n"]))
def test_force_never_replaces_arbitrary_bytes(src, tmp_path, content, prefix):
    out = tmp_path / "mine.bin"
    out.write_bytes(prefix + content)
    with pytest.raises(StreamnnError, match="not a readable streamnn store"):
        pack(src, out, size=4, workers=1, force=True)
    assert out.read_bytes() == prefix + content


def test_an_output_inside_src_is_refused(src, tmp_path):
    photo = src / "cats" / "cat.1.jpg"
    data = photo.read_bytes()
    for out in (photo, src / "new.h5", src / "cats" / ".." / "x.h5"):
        with pytest.raises(StreamnnError, match="lies inside SRC"):
            pack(src, out, size=4, workers=1, force=True)
    link = tmp_path / "into-src"
    link.symlink_to(src / "dogs")
    with pytest.raises(StreamnnError, match="lies inside SRC"):
        pack(src, link / "s.h5", size=4, workers=1)
    src_link = tmp_path / "src-link"
    src_link.symlink_to(src)
    with pytest.raises(StreamnnError, match="lies inside SRC"):
        pack(src_link, src / "s.h5", size=4, workers=1)
    assert photo.read_bytes() == data and not (src / "new.h5").exists() and not (src / "dogs" / "s.h5").exists()


def test_force_replaces_an_earlier_store(src, store):
    r = pack(src, store, size=6, workers=1, force=True)
    assert r.image_shape == (6, 6, 3) and is_store_file(store)


# -- 1. folder links -------------------------------------------------------------------------
def test_folder_links_loops_and_duplicates(tmp_path):
    root = tmp_path / "src"
    make_tree(root, {"training_set": {"cats": 3, "dogs": 3}, "test_set": {"cats": 1, "dogs": 1}}, h=10, w=10)
    outside = tmp_path / "elsewhere"
    make_tree(outside, {"": {"more": 2}}, h=10, w=10)
    (root / "training_set" / "up").symlink_to("..")                  # above: a loop
    (root / "training_set" / "cats" / "loop").symlink_to(".")        # itself: a loop
    (root / "training_set" / "dogs" / "again").symlink_to("../cats")  # back into the tree
    (root / "training_set" / "cats" / "ext").symlink_to(outside / "more")   # outside: followed once
    (root / "training_set" / "dogs" / "ext2").symlink_to(outside / "more")  # the same target: not again
    (root / "training_set" / "cats" / "top").symlink_to(tmp_path)    # holds SRC: a loop
    (root / "training_set" / "cats" / "photo.jpg").symlink_to(outside / "more" / "more.1.jpg")  # a file link
    r = pack(root, tmp_path / "s.h5", size=4, workers=1, max_skip_fraction=0.5)
    assert r.class_names == ["cats", "dogs"]
    assert r.counts == {"train": {"cats": 3 + 2 + 1, "dogs": 3}, "test": {"cats": 1, "dogs": 1}}
    skipped = dict(r.skipped)
    assert skipped["training_set/up"].endswith("leads back into SRC")  # (to SRC itself)
    assert skipped["training_set/cats/top"].endswith("leads to a folder holding SRC (a loop)")
    assert skipped["training_set/cats/loop"].endswith("leads back into SRC")
    assert skipped["training_set/dogs/again"].endswith("leads back into SRC")
    assert "already reached by a link" in skipped["training_set/dogs/ext2"]
    assert len(skipped) == 5
    with open_store(tmp_path / "s.h5") as s:
        assert "training_set/cats/ext/more.1.jpg" in s.paths("train")
        assert dict(s.skipped()) == skipped


_PLACES = ["src/a", "src/b", "src/a/deep", "out", "out/x"]
_TARGETS = ["src", "src/a", "src/b", "src/a/deep", ".", "out", "out/x"]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(links=st.lists(st.tuples(st.sampled_from(_PLACES), st.sampled_from(_TARGETS)), max_size=6))
def test_folder_links_never_pack_a_file_twice_nor_loop(tmp_path_factory, links):
    """Whatever folder links point wherever: the scan ends, every real file of SRC is packed
    exactly once, and files outside SRC at most once."""
    base = tmp_path_factory.mktemp("links")
    image = encode(smooth_image(1, 10, 10))
    for folder in ("src/a/deep", "src/b", "out/x"):
        (base / folder).mkdir(parents=True, exist_ok=True)
        (base / folder / "img.jpg").write_bytes(image)
    for i, (place, target) in enumerate(links):
        (base / place / f"link{i}").symlink_to(base / target)
    plan = scan_source(base / "src")
    real = [os.path.realpath(plan.root / p) for items in plan.files.values() for p, _ in items]
    assert len(real) == len(set(real))
    inside = {os.path.realpath(base / f / "img.jpg") for f in ("src/a/deep", "src/b")}
    assert inside <= set(real)


def test_a_src_holding_only_links_to_itself_is_an_error(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a").symlink_to(".")
    (tmp_path / "src" / "b").symlink_to("..")
    with pytest.raises(StreamnnError, match="no class folders"):
        pack(tmp_path / "src", tmp_path / "s.h5", size=4, workers=1)


# -- 3. names that are not UTF-8 ---------------------------------------------------------------
def test_names_that_are_not_utf8_pack_and_are_kept_losslessly(tmp_path):
    base = os.fsencode(tmp_path)
    root = base + b"/src\xfe"
    make_tree(Path(os.fsdecode(root)), {"": {"cats": 3, "dogs": 3}}, h=10, w=10)
    os.rename(root + b"/dogs", root + b"/caf\xe9")
    os.rename(root + b"/cats/cat.1.jpg", root + b"/cats/ph\xf6to\n1.jpg")
    with open(root + b"/cats/bad\xff.jpg", "wb") as f:
        f.write(b"not an image")
    out = base + b"/out\xfd.h5"
    r = subprocess.run([*PACK_CLI, root, "-o", out, "--size", "4", "--workers", "1", "--max-skip-fraction", "0.5"],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    text = r.stdout.decode("utf-8")  # printable, valid UTF-8
    assert "out\\xfd.h5" in text and "cats/bad\\xff.jpg" in text and "caf\\xe9" in text
    with open_store(os.fsdecode(out)) as s:
        assert s.class_names == ["caf\\xe9", "cats"]
        paths = s.paths("train")
        assert "cats/ph\\xf6to\\x0a1.jpg" in paths
        assert {path_bytes(p) for p in paths} == {
            os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs} - {b"cats/bad\xff.jpg"}
        assert dict(s.skipped()) == {"cats/bad\\xff.jpg": "not an image (unrecognized format)"}
        assert "\\xfe" in s.options["source_root"]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(st.binary(min_size=1, max_size=20).filter(lambda b: b"/" not in b and b"\0" not in b
                                                               and not b.startswith(b".") and b != b"__MACOSX"),
                      min_size=1, max_size=4, unique=True))
def test_any_byte_name_round_trips(src, tmp_path_factory, names):
    root = tmp_path_factory.mktemp("bytes")
    image = (src / "cats" / "cat.1.jpg").read_bytes()
    for name in names:
        os.makedirs(os.fsencode(root) + b"/cls", exist_ok=True)
        with open(os.fsencode(root) + b"/cls/" + name, "wb") as f:
            f.write(image)
    r = pack(root, root.parent / (root.name + ".h5"), size=4, workers=1, classes=["cls"])  # one class, on purpose
    with open_store(r.out) as s:
        assert sorted(path_bytes(p) for p in s.paths("train")) == sorted(b"cls/" + n for n in names)


# -- 3. disks that are full or read-only, names that are too long ----------------------------------
@contextlib.contextmanager
def tmpfs(where: Path, options: str) -> Iterator[Path]:
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root and mount rights): {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_a_full_disk_is_one_line_naming_the_output(src, tmp_path):
    with tmpfs(tmp_path / "small", "size=48k") as disk:
        code, _, err = run_cli(src, "-o", disk / "s.h5", "--size", "40", "--workers", "1")
        assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"Error: {disk / 's.h5'}: ") and "No space left on device" in err
        assert os.listdir(disk) == []


def test_a_file_size_limit_is_one_line_naming_the_output(src, tmp_path):
    """Without root: RLIMIT_FSIZE makes writes past 40 kB fail with EFBIG (Python ignores SIGXFSZ)."""
    out = tmp_path / "s.h5"
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (40000, 40000)); "
            "from streamnn.cli.pack import main; sys.argv[0] = 'streamnn-pack'; main()")
    r = subprocess.run([sys.executable, "-c", code, str(src), "-o", str(out), "--size", "40", "--workers", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.startswith(f"Error: {out}: ") and "File too large" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and os.listdir(tmp_path) == []


def test_a_read_only_folder_is_one_line_naming_the_output(src, tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as disk:
        code, _, err = run_cli(src, "-o", disk / "s.h5", "--workers", "1")
        assert code == 1 and "Read-only file system" in err and str(disk / "s.h5") in err and err.count("\n") == 1


@pytest.mark.parametrize("length", [250, 255])
def test_any_legal_name_length_works(tmp_path, length):
    """The temporary names beside OUT (the store's and its compaction's) are cut to fit NAME_MAX."""
    root = tmp_path / "src"
    make_tree(root, {"": {"cats": 9, "dogs": 9}}, h=10, w=10)
    (root / "cats" / "bad.jpg").write_bytes(b"skipped: the store is compacted through a second temporary file")
    out = tmp_path / ("x" * (length - 3) + ".h5")
    code, _, err = run_cli(root, "-o", out, "--workers", "1", "--size", "4")
    assert code == 0, err
    assert is_store_file(out) and sorted(os.listdir(tmp_path)) == sorted(["src", out.name])
    with open_store(out) as s:
        assert s.skipped() == [("cats/bad.jpg", "not an image (unrecognized format)")]


# -- 4. bad --classes --------------------------------------------------------------------------
@pytest.mark.parametrize("classes,why", [("cats,cats", "'cats' is given twice"), ("cats,", "empty class name"),
                                         (",", "empty class name"), ("cats, ,dogs", "empty class name"),
                                         ("", "--classes is empty"), ("cows", "'cows' not found"),
                                         ("dogs, dogs ", "'dogs' is given twice")])
def test_bad_class_lists_are_errors(src, tmp_path, classes, why):
    code, _, err = run_cli(src, "-o", tmp_path / "s.h5", "--classes", classes, "--workers", "1")
    assert code == 1 and why in err and err.count("\n") == 1, err
    assert os.listdir(tmp_path) == []


# -- 5. huge files -----------------------------------------------------------------------------
def test_a_huge_file_is_skipped_unread(src, tmp_path):
    root = tmp_path / "src"
    make_tree(root, {"": {"cats": 9, "dogs": 9}}, h=10, w=10)
    with open(root / "cats" / "x.jpg", "wb") as f:  # 3 GB, sparse: no disk space used
        f.write((root / "cats" / "cat.1.jpg").read_bytes())
        f.truncate(3 << 30)
    t0 = time.perf_counter()
    r = pack(root, tmp_path / "s.h5", size=4, workers=1)
    assert time.perf_counter() - t0 < 10
    assert dict(r.skipped) == {"cats/x.jpg": "file too large: 3072.0 MiB, over the limit of 512.0 MiB "
                                             "(max_file_size); not read"}
    with pytest.raises(StreamnnError, match="file too large: [0-9]+ bytes, over the limit of 500 bytes"):
        pack(root, tmp_path / "t.h5", size=4, workers=1, max_file_size=500, max_skip_fraction=1)


# -- 2. processes and signals ------------------------------------------------------------------
def run_processes(token: str) -> list[int]:
    """Pids of live processes whose environment carries the run's token."""
    found = []
    needle = f"STREAMNN_TEST_RUN={token}".encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                if status != "Z":
                    found.append(int(pid))
    return found


def start_run(cmd: list[str], tmp_path: Path, **env: str) -> tuple[subprocess.Popen, str]:
    token = uuid.uuid4().hex
    full_env = {**os.environ, **env, "STREAMNN_TEST_RUN": token, "STREAMNN_TEST_BLOCKED": str(tmp_path / "blocked"),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(BLOCKER), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env)
    return proc, token


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(what)
        time.sleep(0.02)


def start_blocked_pool_run(tmp_path: Path) -> tuple[subprocess.Popen, str]:
    """A run with two workers, one of which waits (forever) decoding cat.7.jpg."""
    src = tmp_path / "src"
    make_tree(src, {"": {"cats": 40, "dogs": 40}}, h=10, w=10)
    proc, token = start_run([*POOL_CLI, str(src), "-o", str(tmp_path / "s.h5"), "--size", "8", "--workers", "2"],
                            tmp_path, STREAMNN_TEST_BLOCK_ON="cat.7.jpg")
    try:
        wait_for(lambda: (tmp_path / "blocked").exists(), 60, "the run did not reach the blocking point")
    except AssertionError:
        proc.kill()
        raise
    return proc, token


def test_sigkill_of_the_run_leaves_no_process_and_closes_its_output(tmp_path):
    """A worker is blocked decoding one file; the parent is SIGKILLed: every worker must die with
    it, and a reader of the run's stdout/stderr must see end of file."""
    proc, token = start_blocked_pool_run(tmp_path)
    try:
        assert len(run_processes(token)) == 3  # the run and its two workers
        proc.kill()
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=10)  # returns only at EOF of both pipes
        assert time.monotonic() - t0 < 5
        wait_for(lambda: not run_processes(token), 5, f"processes survived: {run_processes(token)}")
    finally:
        for pid in run_processes(token):
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL and b"Traceback" not in err


def test_sigkill_while_the_workers_start_leaves_no_process(tmp_path):
    """Killed while its workers are still importing NumPy and OpenCV: they die too."""
    src = tmp_path / "src"
    make_tree(src, {"": {"cats": 40, "dogs": 40}}, h=10, w=10)
    proc, token = start_run([*POOL_CLI, str(src), "-o", str(tmp_path / "s.h5"), "--size", "8", "--workers", "2"],
                            tmp_path)
    try:
        wait_for(lambda: len(run_processes(token)) >= 3 or proc.poll() is not None, 60, "no workers started")
        proc.kill()
        proc.communicate(timeout=10)
        wait_for(lambda: not run_processes(token), 5, f"processes survived: {run_processes(token)}")
    finally:
        for pid in run_processes(token):
            os.kill(pid, signal.SIGKILL)


def test_a_dying_worker_is_an_error_not_a_hang(tmp_path):
    proc, token = start_blocked_pool_run(tmp_path)
    try:
        for pid in run_processes(token):
            if pid != proc.pid:
                os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 1 and b"a decoding worker process died" in err and b"Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["blocked", "src"]


def check_interrupted(proc: subprocess.Popen, token: str, sigs: set[int], err: bytes, store: Path,
                      previous: bytes) -> None:
    """Exit 128 + the signal (when two were sent, either: the process may see them at once and
    Python handles the lower number first), one line, no traceback, nothing left behind."""
    assert proc.returncode in {128 + s for s in sigs}, err
    assert b"Traceback" not in err, err.decode()
    if err.decode().endswith(f"({store} is the new, complete store)\n"):  # the signal came after the rename
        assert is_store_file(store) and store.read_bytes() != previous
    else:
        assert err.decode().endswith(f"Error: interrupted; nothing written ({store} left as it was)\n"), err
        assert store.read_bytes() == previous
    assert not list(store.parent.glob(TMP_PREFIX + "*"))
    wait_for(lambda: not run_processes(token), 5, f"processes survived: {run_processes(token)}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("cli", ["in-process", "pool"])
def test_a_signal_mid_decode_exits_130_or_143_and_writes_nothing(tmp_path, sig, cli):
    src = tmp_path / "src"
    make_tree(src, {"": {"cats": 40, "dogs": 40}}, h=10, w=10)
    out = tmp_path / "s.h5"
    pack(src, out, size=4, workers=1)
    previous = out.read_bytes()
    cmd = [*(PACK_CLI if cli == "in-process" else POOL_CLI), str(src), "-o", str(out), "--force", "--size", "8",
           "--workers", "1" if cli == "in-process" else "2"]
    proc, token = start_run(cmd, tmp_path, STREAMNN_TEST_BLOCK_ON="cat.7.jpg")
    try:
        wait_for(lambda: (tmp_path / "blocked").exists(), 60, "the run did not reach the blocking point")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    (tmp_path / "blocked").unlink()
    check_interrupted(proc, token, {sig}, err, out, previous)


def test_signal_stress_at_random_moments(tmp_path):
    """Signals at random moments of a packing run (pool starting, decoding, writing, a second
    signal during the clean-up): every run ends in 130/143 with nothing written, or exits 0
    having written the complete store, and never leaves a process behind."""
    src = tmp_path / "src"
    make_tree(src, {"": {"cats": 150, "dogs": 150}}, h=12, w=12)
    out = tmp_path / "s.h5"
    pack(src, out, size=4, workers=1)
    previous = out.read_bytes()
    rng = random.Random(12)
    interrupted = 0
    for trial in range(int(os.environ.get("STREAMNN_STRESS_TRIALS", "8"))):
        sig = rng.choice([signal.SIGINT, signal.SIGTERM])
        proc, token = start_run([*PACK_CLI, str(src), "-o", str(out), "--force", "--size", "32", "--workers", "2"],
                                tmp_path)
        try:
            wait_for(lambda: list(tmp_path.glob(TMP_PREFIX + "*")) or proc.poll() is not None, 60, "no start")
            time.sleep(rng.uniform(0, 0.4))
            proc.send_signal(sig)
            sent = {sig}
            if rng.random() < 0.3:
                time.sleep(rng.uniform(0, 0.05))
                second = rng.choice([signal.SIGINT, signal.SIGTERM])
                sent.add(second)
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(second)
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        if proc.returncode == 0:  # finished before the signal
            assert is_store_file(out)
            previous = out.read_bytes()
            wait_for(lambda: not run_processes(token), 5, "processes survived")
            continue
        interrupted += 1
        check_interrupted(proc, token, sent, err, out, previous)
        previous = out.read_bytes()
    assert interrupted >= 3


def test_a_stop_swallowed_inside_a_destructor_is_raised_at_the_next_check(capfd):
    """Python prints and drops an exception raised by a signal handler while a destructor runs
    (the intermittent "KeyboardInterrupt traceback, then exit 0"): the request remembers it."""
    from streamnn.cli.common import Terminated, sigterm_as_interrupt

    class SignalsInDestructor:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(1000))  # the handler runs here, inside __del__

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    saved_hook = sys.unraisablehook
    survived = []
    try:
        with pytest.raises(Terminated), sigterm_as_interrupt() as stop:
            obj = SignalsInDestructor()
            del obj
            survived.append(stop.signum)  # the exception was swallowed: we are still running
            stop.check()
        assert survived == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # stopping: later signals are ignored
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        sys.unraisablehook = saved_hook
    assert "Traceback" not in capfd.readouterr().err


# -- the worker protocol and life cycle --------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(names=st.lists(st.binary(min_size=1, max_size=30).filter(lambda b: b"\0" not in b), max_size=5),
       flags=st.lists(st.booleans(), min_size=5, max_size=5), ok=st.lists(st.booleans(), min_size=5, max_size=5))
def test_requests_and_results_round_trip_without_pickle(names, flags, ok):
    import numpy as np

    from streamnn.pack.worker import _decode_request, _encode_result, decode_result, encode_request

    paths = [os.fsdecode(n) for n in names]
    assert _decode_request(encode_request(paths, flags[:len(paths)])) == (paths, flags[:len(paths)])
    kwargs = {"size": (3, 2), "grayscale": False}
    reasons = [None if good else f"bad {i} \u00e9" for i, good in enumerate(ok[:len(paths)])]
    n = reasons.count(None)
    stack = np.random.default_rng(len(paths)).integers(0, 256, (n, 3, 2, 3), dtype=np.uint8)
    sums = (n, np.arange(18, dtype=np.uint16), np.arange(18, dtype=np.uint32) * 7) if n else None
    got_stack, got_reasons, got_sums = decode_result(_encode_result((stack, reasons, sums)), kwargs)
    assert np.array_equal(got_stack, stack) and got_reasons == reasons
    assert (got_sums is None) == (sums is None)
    if sums:
        assert got_sums[0] == n and np.array_equal(got_sums[1], sums[1]) and np.array_equal(got_sums[2], sums[2])


def test_a_worker_starts_with_stop_signals_blocked_and_ends_when_its_pipe_closes():
    """The portable half of "workers die with the parent": end of file on the request pipe."""
    from streamnn.pack.pool import WorkerProcess

    w = WorkerProcess(dict(os.environ), {"size": [4, 4], "grayscale": False})
    try:
        blocked = int(next(line for line in Path(f"/proc/{w.proc.pid}/status").read_text().splitlines()
                           if line.startswith("SigBlk:")).split()[1], 16)
        assert blocked & (1 << (signal.SIGINT - 1)) and blocked & (1 << (signal.SIGTERM - 1))
        w.end_requests()
        assert w.proc.wait(timeout=30) == 0
    finally:
        w.close(kill=True)


def test_a_worker_whose_parent_is_not_the_expected_one_exits_at_once():
    code = "from streamnn.pack.worker import worker_main; worker_main()"
    r = subprocess.run([sys.executable, "-c", code, "0", "1", "1"], capture_output=True, timeout=60)
    assert r.returncode == 1 and r.stderr == b""


def test_a_worker_imports_no_h5py_and_no_store_code():
    """A worker's start-up is a fixed cost of every pack: it imports the decoder, not the store."""
    code = ("import sys; from streamnn.pack.worker import worker_main; "
            "print(sorted(m for m in sys.modules if m == 'h5py' or m.startswith(('streamnn.data', 'streamnn.pack.job'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert r.stdout.strip() == "[]"
