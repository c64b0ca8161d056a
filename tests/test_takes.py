"""What a consumer takes of an epoch (epoch.Takes), and the batches read ahead for it."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from test_loader import make_store

from streamnn.data.epoch import Takes
from streamnn.data.loader import Loader


def taken(t: Takes, j: int, later: bool) -> bool:
    d = j - (t.again if later else t.first)
    return d >= 0 and d % t.step < t.run


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 40), st.integers(1, 5), st.integers(1, 12), st.integers(0, 40), st.integers(0, 60), st.booleans())
def test_next_is_the_first_batch_taken_from_k(first, run, step, again, k, later):
    t = Takes(first, run, min(max(run, step), 12), again)
    assert t.next(k, later) == next(j for j in range(k, 200) if taken(t, j, later))


def test_a_worker_reads_ahead_its_own_batches_only(tmp_path):
    """Worker w of N taking groups of G: the batches read ahead are the next ones of its own share,
    into the next epoch (where its share starts again at w x G)."""
    path = tmp_path / "s.h5"
    make_store(path, 40, dtype="uint8")
    with Loader(path, "train", batch_size=4, seed=0) as L:  # 10 batches an epoch
        maker = L._batches()
        L.takes = Takes(1 + 1 * 2, 2, 3 * 2, again=1 * 2)  # worker 1 of 3, groups of 2, from batch 1
        assert maker._ahead(0, 3, 6) == [(0, 3), (0, 4), (0, 9), (1, 2), (1, 3), (1, 8)]
        L.takes = Takes(0, 1, 2, again=1)  # worker 1 of 2 resumed at batch 0: its share later is 1, 3, ...
        assert maker._ahead(0, 8, 3) == [(0, 8), (1, 1), (1, 3)]
        L.takes = Takes(0, 1, 4, again=20)  # nothing of later epochs
        assert maker._ahead(0, 5, 4) == [(0, 8)]
        L.takes = Takes()
        assert maker._ahead(0, 8, 4) == [(0, 8), (0, 9), (1, 0), (1, 1)]
