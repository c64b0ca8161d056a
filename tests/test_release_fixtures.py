"""Files written by streamnn 0.1.0 (tests/fixtures/release-0.1.0) still open, evaluate and resume bit-identically.

The fixtures were written once by that release, with OpenBLAS's Haswell kernels: three runs each
stopped mid-epoch (``*-stopped``) and run to the end (``*-done``), on a float32, a uint8 and a sharded
store, with the evaluation and prediction outputs of that release in ``expected.json``. The
comparisons with their numbers are bit for bit, so they run with that kernel (``conftest.recorded_blas``).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from streamnn import open_store
from streamnn.run.checkpoint import differences, load_checkpoint
from streamnn.cli.eval import main as eval_main
from streamnn.cli.predict import main as predict_main
from streamnn.run.trainer import LATEST, Trainer

FIXTURES = Path(__file__).parent / "fixtures" / "release-0.1.0"
RUNS = {"mlp": "store.h5", "cnn": "store-u8.h5", "sharded": "sharded.h5"}
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())


@pytest.fixture()
def fixtures(tmp_path: Path, monkeypatch) -> Path:
    """A writable copy of the fixtures (a resume writes into its run folder), as the working directory."""
    copy = tmp_path / "release"
    shutil.copytree(FIXTURES, copy, ignore=shutil.ignore_patterns("expected.json"))
    monkeypatch.chdir(copy)
    return copy


def without_store_path(content: dict) -> dict:
    config = json.loads(content["config"])
    config.pop("store")
    return {**content, "config": json.dumps(config, sort_keys=True)}


@pytest.mark.parametrize("store", sorted(set(RUNS.values())))
def test_old_stores_open_and_verify(fixtures, store):
    with open_store(store) as s:
        s.verify()
        assert s.class_names == ["cats", "dogs"] and s.n_rows("train") == 24 and s.n_rows("test") == 8


@pytest.mark.parametrize("run", sorted(RUNS))
def test_old_run_resumes_bit_identically(fixtures, run, recorded_blas):
    with Trainer.resume(fixtures / f"{run}-stopped", store=RUNS[run], verbose=False) as t:
        t.fit()
    resumed = load_checkpoint(fixtures / f"{run}-stopped" / LATEST)
    done = load_checkpoint(fixtures / f"{run}-done" / LATEST)
    assert differences(without_store_path(resumed), without_store_path(done)) == []
    for name in ("metrics.csv", "steps.csv"):
        assert (fixtures / f"{run}-stopped" / name).read_text() == (fixtures / f"{run}-done" / name).read_text()


@pytest.mark.parametrize("run", sorted(RUNS))
def test_old_checkpoints_evaluate_and_predict_as_they_did(fixtures, run, recorded_blas):
    ckpt = f"{run}-done/{LATEST}"
    result = CliRunner().invoke(eval_main, [ckpt, RUNS[run], "--json", "--tta", "flip"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == EXPECTED[run]["eval"]
    result = CliRunner().invoke(predict_main, [ckpt, "images", "--json"])
    assert result.exit_code == 0, result.output
    assert [json.loads(line) for line in result.output.splitlines()] == EXPECTED[run]["predict"]
