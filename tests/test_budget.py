"""The memory budget counts exactly the parameters the models allocate (checked against real models)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamnn import StreamnnError
from streamnn.nn import models
from streamnn.run import budget


def _allocated(model) -> int:
    return sum(int(p.size) for p in model.params.values())


@settings(max_examples=10, deadline=None)
@given(sizes=st.lists(st.integers(1, 12), min_size=2, max_size=4))
def test_dense_count_matches_the_model(sizes):
    sizes[-1] = max(sizes[-1], 2)
    acts = ["relu"] * (len(sizes) - 2) + ["softmax"]
    model = models.DeepNetwork(sizes, acts)
    assert budget.parameter_count(model.config()) == _allocated(model)


@settings(max_examples=8, deadline=None)
@given(h=st.integers(4, 12), w=st.integers(4, 12), c=st.sampled_from([1, 3]),
       conv=st.lists(st.integers(1, 4), min_size=1, max_size=2), hidden=st.lists(st.integers(1, 5), max_size=2),
       n_classes=st.integers(2, 4), kernel=st.sampled_from([1, 3]), batch_norm=st.booleans(),
       conv_bias=st.booleans(), head=st.sampled_from(sorted(models.HEADS)))
def test_conv_count_matches_the_model(h, w, c, conv, hidden, n_classes, kernel, batch_norm, conv_bias, head):
    model = models.ConvNet((h, w, c), conv, hidden, n_classes, kernel=kernel, batch_norm=batch_norm,
                           conv_bias=conv_bias, head=head)
    assert budget.parameter_count(model.config()) == _allocated(model)


def test_logistic_count_and_refusal_beyond_memory(monkeypatch):
    model = models.LogisticRegression(7)
    assert budget.parameter_count(model.config()) == _allocated(model) == 8
    monkeypatch.setattr(budget, "available_memory", lambda: 10 ** 6)
    budget.check_fits(10 ** 4, 4, 6, "small")
    with pytest.raises(StreamnnError, match=r"big has 100,000 parameters: about 0.0 GB"):
        budget.check_fits(10 ** 5, 4, 6, "big")
    with pytest.raises(StreamnnError, match="neuron_cnt must be a list of positive integers"):
        budget.parameter_count({"type": "DeepNetwork", "neuron_cnt": [3, True]})
    assert np.isfinite(budget.available_memory() or 0)
