"""Learning-rate schedules: values, fractional epochs, configs and argument checks."""
from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamnn import StreamnnError
from streamnn.optim.schedules import FORMULAS, make_schedule


def values(name, epochs, lr0=0.1, **params):
    sched = make_schedule(name, lr0, **params)
    return [sched(e) for e in epochs]


def test_constant():
    assert values("constant", [0, 1, 7.5, 1000]) == [0.1] * 4


def test_hyperbolic_is_the_tutorials_decay():
    assert values("hyperbolic", [0, 1, 2, 0.5], decay=0.2) == pytest.approx(
        [0.1, 0.1 / 1.2, 0.1 / 1.4, 0.1 / 1.1])


def test_step_drops_by_factor_every_n_epochs():
    assert values("step", [0, 2.99, 3, 5.9, 6, 9.5], every=3, factor=0.5) == pytest.approx(
        [0.1, 0.1, 0.05, 0.05, 0.025, 0.0125])
    assert values("step", [0, 10], every=10) == pytest.approx([0.1, 0.01])  # default factor


def test_exponential():
    assert values("exponential", [0, 1, 2, 0.5], factor=0.9) == pytest.approx(
        [0.1, 0.09, 0.081, 0.1 * math.sqrt(0.9)])


def test_cosine_goes_from_lr0_to_min_lr_then_stays():
    assert values("cosine", [0, 2.5, 5, 7.5, 10, 12], total_epochs=10) == pytest.approx(
        [0.1, 0.1 * (1 + math.sqrt(0.5)) / 2, 0.05, 0.1 * (1 - math.sqrt(0.5)) / 2, 0, 0],
        abs=1e-15)
    assert values("cosine", [0, 5, 10, 11], total_epochs=10, min_lr=0.02) == pytest.approx(
        [0.1, 0.06, 0.02, 0.02])


SCHEDULES = [("constant", {}), ("hyperbolic", {"decay": 0.3}), ("step", {"every": 2.0}),
             ("exponential", {"factor": 0.8}), ("cosine", {"total_epochs": 6.0, "min_lr": 0.01})]


@pytest.mark.parametrize("name,params", SCHEDULES)
@given(a=st.floats(0, 50), b=st.floats(0, 50))
def test_never_increase_and_stay_within_lr0(name, params, a, b):
    sched = make_schedule(name, 0.1, **params)
    lo, hi = sorted((a, b))
    assert 0 <= sched(hi) <= sched(lo) <= sched(0) == 0.1


@pytest.mark.parametrize("name,params", SCHEDULES)
def test_config_rebuilds_the_schedule(name, params):
    sched = make_schedule(name, 0.1, **params)
    rebuilt = make_schedule(**json.loads(json.dumps(sched.config())))
    assert rebuilt == sched and [rebuilt(e) for e in (0, 1.5, 9)] == [sched(e) for e in (0, 1.5, 9)]
    assert set(FORMULAS) == {n for n, _ in SCHEDULES}


@pytest.mark.parametrize("name,lr0,params", [
    ("linear", 0.1, {}), ("hyperbolic", 0.1, {}), ("constant", 0.1, {"decay": 1}),
    ("constant", -0.1, {}), ("constant", float("nan"), {}), ("hyperbolic", 0.1, {"decay": -1}),
    ("step", 0.1, {"every": 0}), ("step", 0.1, {"every": 2, "factor": 1.5}),
    ("exponential", 0.1, {"factor": 0}), ("exponential", 0.1, {"factor": "half"}),
    ("cosine", 0.1, {"total_epochs": 0}), ("cosine", 0.1, {"total_epochs": 5, "min_lr": 0.2}),
    ("cosine", 0.1, {"total_epochs": float("inf")}),
])
def test_bad_schedules_are_reported(name, lr0, params):
    with pytest.raises(StreamnnError) as info:
        make_schedule(name, lr0, **params)
    assert "\n" not in str(info.value)


def test_negative_epoch_is_an_error():
    with pytest.raises(ValueError):
        make_schedule("constant", 0.1)(-1)
