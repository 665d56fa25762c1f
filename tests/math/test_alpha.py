import pytest

from wrpo_nemo.alpha import AlphaSchedule, alpha_at


def test_linear_ramp_is_the_papers_alpha_max_times_t_over_T():
    s = AlphaSchedule(kind="linear", alpha_max=0.1)
    total = 311
    assert alpha_at(0, total, s) == 0.0
    for t in (1, 100, 155, 310):
        assert alpha_at(t, total, s) == pytest.approx(0.1 * t / total, rel=1e-15)
    assert alpha_at(total, total, s) == pytest.approx(0.1)
    assert alpha_at(total + 50, total, s) == pytest.approx(0.1)


def test_constant_schedule_is_alpha_max_everywhere():
    s = AlphaSchedule(kind="constant", alpha_max=0.3)
    assert {alpha_at(t, 10, s) for t in range(12)} == {0.3}


def test_ramp_ending_at_a_fraction_then_flat():
    s = AlphaSchedule(kind="linear_until", alpha_max=0.2, ramp_fraction=0.25)
    assert alpha_at(0, 100, s) == 0.0
    assert alpha_at(10, 100, s) == pytest.approx(0.2 * 10 / 25)
    assert alpha_at(25, 100, s) == pytest.approx(0.2)
    assert alpha_at(80, 100, s) == pytest.approx(0.2)


def test_schedule_is_monotone_and_bounded():
    for s in (AlphaSchedule(), AlphaSchedule(kind="linear_until", ramp_fraction=0.4)):
        values = [alpha_at(t, 57, s) for t in range(70)]
        assert values == sorted(values)
        assert min(values) >= 0.0 and max(values) <= s.alpha_max


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kind="cosine"), "^kind must be"),
        (dict(alpha_max=1.5), "^alpha_max must lie"),
        (dict(kind="linear_until", ramp_fraction=0.0), "^ramp_fraction must lie"),
    ],
)
def test_invalid_schedules_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AlphaSchedule(**kwargs)


def test_invalid_steps_raise():
    with pytest.raises(ValueError, match="total_steps"):
        alpha_at(0, 0, AlphaSchedule())
    with pytest.raises(ValueError, match="step must be"):
        alpha_at(-1, 10, AlphaSchedule())
