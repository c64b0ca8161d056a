"""The commands take a store URL (nginx on 127.0.0.1): streamnn-train (and --resume), -eval, -info;
a run trained from the URL equals one trained from the local copy, and its folder records the
URL as given."""
from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from streamnn.cli.eval import main as eval_main
from streamnn.cli.info import main as info_main
from streamnn.cli.train import main as train_main
from streamnn.run.checkpoint import differences, load_checkpoint
from streamnn.run.folder import LATEST

from test_remote import nginx  # noqa: F401  (the session's nginx)
from test_train import CLI_ARGS, make_store


@pytest.fixture(scope="module")
def served(nginx, tmp_path_factory):  # noqa: F811
    path = make_store(tmp_path_factory.mktemp("st") / "cli.h5")
    shutil.copy(path, nginx.root / "cli.h5")
    return path, nginx.url("cli.h5")


def run(command, args):
    r = CliRunner().invoke(command, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.output


def test_train_eval_info_resume_from_a_url(served, tmp_path):
    path, url = served
    args = [*CLI_ARGS, "--epochs", "2"]
    run(train_main, [path, *args, "--out", tmp_path / "local", "-q"])
    run(train_main, [url, *[a if a != "3" or i != CLI_ARGS.index("--epochs") + 1 else "1"
                            for i, a in enumerate(CLI_ARGS)], "--out", tmp_path / "remote", "-q"])
    run(train_main, [url, *args, "--out", tmp_path / "remote", "--resume", "-q"])  # to epoch 2: resumed
    local = load_checkpoint(tmp_path / "local" / LATEST)
    remote = load_checkpoint(tmp_path / "remote" / LATEST)
    assert differences(local, remote) == ["config"]  # weights, optimizer, loader state: bit for bit
    cl, cr = (json.loads(str(c["config"])) if not isinstance(c["config"], dict) else dict(c["config"])
              for c in (local, remote))
    assert cr.pop("store") == url and cl.pop("store") == str(path) and cl == cr
    config = json.loads((tmp_path / "remote" / "config.json").read_text())
    assert config["store"] == url
    local_eval = json.loads(run(eval_main, [tmp_path / "local" / LATEST, path, "--json"]))
    remote_eval = json.loads(run(eval_main, [tmp_path / "remote" / LATEST, url, "--json"]))
    assert remote_eval["store"] == url
    for key in ("accuracy", "loss"):
        assert remote_eval[key] == local_eval[key]
    info = json.loads(run(info_main, [url, "--json"]))
    assert info["path"] == url and info["size_bytes"] == path.stat().st_size
    assert info["fingerprint"] == json.loads(run(info_main, [path, "--json"]))["fingerprint"]
    run(info_main, [url, "--verify", "--grid", tmp_path / "g.png"])
    assert (tmp_path / "g.png").stat().st_size > 0


def test_a_missing_url_is_a_one_line_error(nginx):  # noqa: F811
    r = CliRunner().invoke(info_main, [nginx.url("nothing.h5")])
    assert r.exit_code != 0 and r.output.strip().count("\n") == 0 and "no such object" in r.output


def test_train_with_a_cache_folder_fills_it_and_a_bad_limit_is_a_usage_error(served, tmp_path, monkeypatch):
    from streamnn.data.remote.cache import ENTRY
    path, url = served
    for name in ("STREAMNN_REMOTE_CACHE", "STREAMNN_REMOTE_CACHE_LIMIT"):
        monkeypatch.setenv(name, "")  # restored after the test: the options set them in this process
    run(train_main, [url, *CLI_ARGS, "--out", tmp_path / "run", "-q", "--cache", tmp_path / "cache",
                     "--cache-limit", "1G"])
    assert any(ENTRY.fullmatch(p.name) for p in (tmp_path / "cache").iterdir())
    r = CliRunner().invoke(info_main, [url, "--cache", str(tmp_path / "c"), "--cache-limit", "lots"])
    assert r.exit_code == 2 and "'lots' is not a size" in r.output
