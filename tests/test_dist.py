"""Communicators (streamnn.dist) and the sharded loader on real ``mpiexec -n 2`` jobs."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from mpi import run_mpiexec, run_ranks
from streamnn import StoreWriter, StreamnnError
from streamnn.dist import SingleComm, launcher_world, world
from streamnn.data.loader import Loader


def test_the_launcher_environment_decides_the_world():
    assert launcher_world({}) == (0, 1)
    assert launcher_world({"PMI_SIZE": "4", "PMI_RANK": "3"}) == (3, 4)
    assert launcher_world({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}) == (1, 2)
    assert launcher_world({"MV2_COMM_WORLD_SIZE": "3", "MV2_COMM_WORLD_RANK": "0"}) == (0, 3)
    with pytest.raises(StreamnnError, match="PMI_SIZE='two'"):
        launcher_world({"PMI_SIZE": "two"})


def test_one_process_needs_no_mpi(monkeypatch):
    monkeypatch.delenv("PMI_SIZE", raising=False)
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # importing it would fail
    comm = world()
    assert isinstance(comm, SingleComm) and (comm.rank, comm.size) == (0, 1)
    a = np.arange(5.0)
    comm.allreduce(a)
    comm.broadcast(a)
    comm.barrier()
    assert np.array_equal(a, np.arange(5.0)) and comm.broadcast_bytes(b"xyz") == b"xyz"
    assert comm.gather_bytes(b"xyz") == [b"xyz"] and comm.local_size() == 1


def test_under_mpiexec_without_mpi4py_one_line_says_how_to_install(monkeypatch):
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setenv("PMI_RANK", "1")
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(StreamnnError, match=r"rank 1 of 2, but mpi4py is not installed: pip install") as e:
        world()
    assert "\n" not in str(e.value)


COLLECTIVES = """
    import json, sys
    import numpy as np
    from streamnn.dist import world
    comm = world()
    r = comm.rank
    a = np.arange(7, dtype=np.float32) * (r + 1)
    b = np.full((2, 3), 10.0 ** r)                  # float64, a second buffer in the same call
    comm.allreduce(a, b)
    c = np.arange(4, dtype=np.int64) * (r + 5)
    comm.broadcast(c)
    blob = np.random.default_rng(r).bytes(100_003)  # differs per rank: rank 0's must win
    got = comm.broadcast_bytes(blob)
    empty = comm.broadcast_bytes(b"" if r == 0 else b"ignored")
    gathered = comm.gather_bytes(b"r%d" % r * (r * 3))  # rank 0 sends nothing
    local = comm.local_size()
    comm.barrier()
    with open(f"{sys.argv[1]}/out{r}.json", "w") as f:
        json.dump({"size": comm.size, "a": a.tolist(), "b": b.tolist(), "c": c.tolist(),
                   "blob": got == np.random.default_rng(0).bytes(100_003), "empty": empty == b"",
                   "gathered": [g.decode() for g in gathered], "local": local}, f)
"""


def test_collectives_on_two_ranks(tmp_path):
    result, _ = run_ranks(2, COLLECTIVES, str(tmp_path))
    assert result.returncode == 0, result.stderr
    for r in range(2):
        out = json.loads((tmp_path / f"out{r}.json").read_text())
        assert out["size"] == 2
        assert out["a"] == (np.arange(7) * 3.0).tolist()
        assert out["b"] == [[11.0] * 3] * 2
        assert out["c"] == (np.arange(4) * 5).tolist()
        assert out["blob"] and out["empty"]
        assert out["gathered"] == ([] if r else ["", "r1r1r1"]) and out["local"] == 2


def test_a_killed_rank_ends_the_job(tmp_path):
    """SIGKILL (or the OOM killer) on one rank: mpiexec kills the others and fails, no hang."""
    code = """
        import os, signal
        import numpy as np
        from streamnn.dist import world
        comm = world()
        buf = np.ones(1000)
        for step in range(100_000):
            if comm.rank == 1 and step == 20:
                os.kill(os.getpid(), signal.SIGKILL)
            comm.allreduce(buf)
    """
    result, seconds = run_ranks(2, code, timeout=60)
    assert result.returncode != 0
    assert seconds < 20


def test_a_silent_rank_aborts_the_job_after_the_timeout(tmp_path):
    """A rank that stops answering (hung, stopped, lost machine): the others abort after the deadline."""
    code = """
        import time
        import numpy as np
        from streamnn.dist import world
        comm = world()
        buf = np.ones(10)
        comm.allreduce(buf)
        if comm.rank == 1:
            time.sleep(60)
        comm.allreduce(buf)
    """
    result, seconds = run_ranks(2, code, timeout=60, env={"STREAMNN_MPI_TIMEOUT": "1"})
    assert result.returncode != 0
    assert "Error: rank 0: no answer from the other ranks for 1 s in allreduce" in result.stderr
    assert seconds < 20


def make_id_store(path, n=23, n_test=0):
    """Rows whose first pixel is the row number (n <= 256); a "test" split of n_test random rows."""
    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, (n, 2, 2, 3), dtype=np.uint8)
    px[:, 0, 0, 0] = np.arange(n)
    with StoreWriter(path, class_names=["a", "b"], image_shape=(2, 2, 3)) as w:
        w.add_split("train", n)
        w.write_rows("train", px, np.arange(n) % 2, [f"r{i}" for i in range(n)])
        if n_test:
            w.add_split("test", n_test)
            w.write_rows("test", rng.integers(0, 256, (n_test, 2, 2, 3), dtype=np.uint8),
                         rng.integers(0, 2, n_test), [f"t{i}" for i in range(n_test)])
        w.commit()


def ids(X):
    return np.rint(X[0] * 255).astype(int).tolist()


SHARDED = """
    import json, sys
    import numpy as np
    from streamnn.dist import world
    from streamnn.data.loader import Loader
    comm = world()
    with Loader(sys.argv[1], "train", 5, seed=3, augment="flip", rank=comm.rank, world_size=comm.size) as L:
        out = [[[np.rint(X[0] * 255).astype(int).tolist(), X.tolist()] for X, _ in L] for epoch in range(2)]
    with open(f"{sys.argv[2]}/out{comm.rank}.json", "w") as f:
        json.dump(out, f)
"""


def test_ranks_of_a_job_read_the_one_process_batches(tmp_path):
    store = tmp_path / "s.h5"
    make_id_store(store)
    with Loader(store, "train", 5, seed=3, augment="flip") as L:
        one = [[(ids(X), X.copy()) for X, _ in L] for epoch in range(2)]
    result, _ = run_ranks(2, SHARDED, str(store), str(tmp_path))
    assert result.returncode == 0, result.stderr
    shares = [json.loads((tmp_path / f"out{r}.json").read_text()) for r in range(2)]
    for epoch in range(2):
        assert len(shares[0][epoch]) == len(shares[1][epoch]) == len(one[epoch]) == 5  # 23 rows, batch 5
        for k, (batch_ids, X) in enumerate(one[epoch]):
            for r in range(2):
                got_ids, got_X = shares[r][epoch][k]
                assert got_ids == batch_ids[r::2]
                assert np.array_equal(np.asarray(got_X, np.float32).reshape(X[:, r::2].shape), X[:, r::2])


def test_mpi_tests_fail_in_ci_without_mpi_and_skip_elsewhere(monkeypatch):
    import importlib.util

    import mpi

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run the MPI tests, but mpi4py"):
        mpi.require_mpi()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match=r"mpi4py .*not installed \(pip install -e '.\[test,mpi\]'\)"):
        mpi.require_mpi()


def test_streamnn_eval_under_mpiexec_sums_the_shares(tmp_path):
    from streamnn.run.trainer import Trainer

    store = tmp_path / "s.h5"
    make_id_store(store, n=40, n_test=37)
    with Trainer({"store": str(store), "hidden": [4], "epochs": 1, "batch_size": 8}, tmp_path / "run",
                 verbose=False) as trainer:
        trainer.fit()
    cmd = [sys.executable, "-m", "streamnn.cli.eval", str(tmp_path / "run" / "checkpoint-latest.h5"), str(store),
           "--json", "--batch-size", "5", "--tta", "flip"]
    one = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result, _ = run_mpiexec(2, cmd)
    assert result.returncode == 0, result.stderr
    a, b = json.loads(one.stdout), json.loads(result.stdout)  # printed once, by rank 0
    assert b["n"] == a["n"] == 37 and b["confusion"] == a["confusion"] and b["accuracy"] == a["accuracy"]
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)  # float32 model: BLAS rounds by batch width
    assert b["per_class"] == a["per_class"]
    bad, _ = run_mpiexec(2, [*cmd[:3], str(tmp_path / "missing.h5"), *cmd[4:]])
    assert bad.returncode == 1 and bad.stderr.count("Error:") == 1, bad.stderr  # one line, not one per rank
    assert "missing.h5" in bad.stderr


def test_under_mpiexec_without_mpi4py_the_command_stops_with_one_line(tmp_path):
    blocked = tmp_path / "blocked" / "mpi4py"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('blocked by the test')\n")
    store = tmp_path / "s.h5"
    make_id_store(store, n=10, n_test=5)
    cmd = [sys.executable, "-m", "streamnn.cli.eval", str(tmp_path / "none.h5"), str(store)]
    result, _ = run_mpiexec(2, cmd, env={"PYTHONPATH": str(blocked.parent)})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "Error: started by mpiexec as rank 0 of 2, but mpi4py is not installed: pip install 'streamnn[mpi]' "
        "(mpi4py and MPICH), or mpi4py built for your cluster's MPI"]


def test_a_rank_draws_the_one_process_dropout_masks_of_its_columns():
    from streamnn.nn.models import ConvNet, DeepNetwork
    from streamnn.nn import Dropout

    def masks(model):
        return [layer.mask for layer in model.layers if isinstance(layer, Dropout)]

    X = np.random.default_rng(0).random((48, 7), dtype=np.float32)
    for make in (lambda: DeepNetwork([48, 9, 5, 1], ["relu", "relu", "sigmoid"], dropout=0.4, seed=3),
                 lambda: ConvNet((4, 4, 3), [2], [6], 3, dropout=0.4, seed=3)):
        one, rank1 = make(), make()
        one.forward(X)
        rank1.forward(X[:, 1::3], share=(1, 3, 7))
        assert len(masks(one)) >= 1
        for full, part in zip(masks(one), masks(rank1)):
            np.testing.assert_array_equal(part, full[..., 1::3] if full.shape[-1] == 7 else full[1::3])
        assert one.rng.bit_generator.state == rank1.rng.bit_generator.state  # the ranks' generators stay equal


def test_a_rank_with_no_rows_of_a_batch_adds_nothing():
    """The uneven last batch can leave a rank without rows: forward and backward still work, gradient 0."""
    from streamnn.nn.models import ConvNet, DeepNetwork

    for model, Y in ((DeepNetwork([48, 5, 1], ["relu", "sigmoid"], dropout=0.2), np.zeros((1, 0), np.float32)),
                     (ConvNet((4, 4, 3), [2], [6], 3, dropout=0.2), np.zeros((3, 0), np.float32))):
        model.forward(np.zeros((48, 0), np.float32), share=(1, 2, 1))
        assert float(model.loss_sum(Y)) == 0.0
        model.backward(Y, count=1, decay=False)
        assert not model.flat_grads.any()
