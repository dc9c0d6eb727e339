"""ProRes schedules against METHODS.md section 1, written out independently here."""

from __future__ import annotations

import math

import pytest

from megatron_ext.prores import SCHEDULES, ProResConfig, full_warmup_steps, prores_alpha


def clip01(x: float) -> float:
    return min(max(x, 0.0), 1.0)


def expected(name: str, l: int, t: int, L: int, T: int) -> float:
    stage = clip01((t - T * (l - 1)) / T)
    table = {
        "linear": min(t / (T * l), 1.0),
        "linear-sqrt": min(t / (T * l), 1.0) ** 0.5,
        "linear-square": min(t / (T * l), 1.0) ** 2,
        "equal": min(t / T, 1.0),
        "reverse": min(t / (T * (L - l + 1)), 1.0),
        "stagewise": stage,
        "stagewise-inv-L": 1 / L + (1 - 1 / L) * stage,
        "stagewise-inv-sqrt-l": 1 / math.sqrt(l) + (1 - 1 / math.sqrt(l)) * stage,
        "fixed-inv-L": 1 / L,
        "fixed-inv-sqrt-L": 1 / math.sqrt(L),
        "fixed-inv-sqrt-l": 1 / math.sqrt(l),
    }
    return table[name]


L, T = 6, 10
STEPS = sorted({0, 1, T - 1, T, T + 1, 2 * T, 3 * T - 1, 3 * T, 5 * T, L * T - 1, L * T, L * T + 7, 10 * L * T})


def test_every_documented_schedule_is_implemented():
    assert set(SCHEDULES) == {
        "linear", "linear-sqrt", "linear-square", "equal", "reverse", "stagewise", "stagewise-inv-L",
        "stagewise-inv-sqrt-l", "fixed-inv-L", "fixed-inv-sqrt-L", "fixed-inv-sqrt-l",
    }


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_matches_formula_on_grid(name):
    for layer in range(1, L + 1):
        for step in STEPS:
            assert prores_alpha(name, layer, step, L, T) == pytest.approx(
                expected(name, layer, step, L, T), abs=1e-12
            ), (name, layer, step)


@pytest.mark.parametrize("name", [s for s in SCHEDULES if not s.startswith("fixed")])
def test_warmup_schedules_start_at_zero_and_end_at_one(name):
    for layer in range(1, L + 1):
        start = prores_alpha(name, layer, 0, L, T)
        floor = {"stagewise-inv-L": 1 / L, "stagewise-inv-sqrt-l": 1 / math.sqrt(layer)}.get(name, 0.0)
        assert start == pytest.approx(floor)
        assert prores_alpha(name, layer, full_warmup_steps(name, L, T), L, T) == 1.0


def test_exact_switch_on_points():
    # linear: layer l reaches 1 exactly at T*l, not one step earlier.
    for layer in (1, L):
        assert prores_alpha("linear", layer, T * layer, L, T) == 1.0
        assert prores_alpha("linear", layer, T * layer - 1, L, T) < 1.0
    # stagewise: layer l is off until T*(l-1), ramps for T steps, then stays on.
    for layer in (1, 3, L):
        assert prores_alpha("stagewise", layer, T * (layer - 1), L, T) == 0.0
        assert prores_alpha("stagewise", layer, T * (layer - 1) + 1, L, T) == pytest.approx(1 / T)
        assert prores_alpha("stagewise", layer, T * layer, L, T) == 1.0
    # reverse: the LAST layer warms first.
    assert prores_alpha("reverse", L, T, L, T) == 1.0
    assert prores_alpha("reverse", 1, T, L, T) == pytest.approx(1 / L)
    assert full_warmup_steps("equal", L, T) == T and full_warmup_steps("fixed-inv-L", L, T) is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(schedule="linear_sqrt"), "unknown ProRes schedule 'linear_sqrt'"),
        (dict(warmup=0), "warmup T must be an integer >= 1"),
        (dict(warmup=-5), "got -5"),
        (dict(layer=0), "layer must be in 1..6"),
        (dict(layer=7), "got 7"),
        (dict(step=-1), "step must be >= 0"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_value(kwargs, message):
    args = dict(schedule="linear", layer=1, step=0, num_layers=L, warmup=T) | kwargs
    with pytest.raises(ValueError, match=message):
        prores_alpha(**args)


def test_config_validates():
    with pytest.raises(ValueError, match="unknown ProRes schedule"):
        ProResConfig(schedule="cosine")
    with pytest.raises(ValueError, match="warmup"):
        ProResConfig(warmup=0)
    assert ProResConfig() == ProResConfig(schedule="linear", warmup=1000)
