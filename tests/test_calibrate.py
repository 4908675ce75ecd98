"""The calibration rule on hand-made floors: thresholds follow the measured floor, within the dtype's minimum and cap;
the user's values win; without a floor the fixed values are used and said so; bit_exact means 0. Then on the real
engine (tiny model, bf16 on the CPU): a stale prefix cache, which moves the gap a few-fold, passes the fixed bf16
thresholds and fails the calibrated ones, by the generic `mismatch` check, while the clean gate passes."""

import pytest

from trl_correct.core.calibrate import CAPS, FACTOR, FIXED, MINIMUMS, calibrate
from trl_correct.core.checks import GateReport, mismatch_check


def floor(mean, p99=None, k3=None, mx=None, n=100):
    return dict(mean_abs_logprob_diff=mean, p99_abs_logprob_diff=p99 if p99 is not None else 5 * mean,
                max_abs_logprob_diff=mx if mx is not None else 8 * mean, kl_k3=k3 if k3 is not None else mean ** 2,
                n_tokens=n, n_nonfinite=0)


@pytest.mark.unit
def test_thresholds_are_a_multiple_of_the_largest_floor():
    c = calibrate({"trainer_vs_itself": floor(0.006), "dtype_rounding": floor(0.005, p99=0.04)}, "bfloat16")
    th = c.values()
    assert th["mean_abs_logprob_diff"] == pytest.approx(4 * 0.006)
    assert th["p99_abs_logprob_diff"] == pytest.approx(4 * 0.04)  # dtype_rounding's p99 is the larger one
    assert th["kl_k3"] == pytest.approx(16 * 0.006 ** 2)
    assert th["max_abs_logprob_diff"] == CAPS["bfloat16"]["max_abs_logprob_diff"]  # max: the cap only
    t = c.thresholds["mean_abs_logprob_diff"]
    assert t.source == "calibrated" and "trainer_vs_itself" in t.rule and t.floor == 0.006
    assert "calibrated from measured floors" in c.summary


@pytest.mark.unit
def test_minimum_and_cap_bound_the_derived_value():
    low = calibrate({"trainer_vs_itself": floor(1e-7)}, "float32")
    assert low.values()["mean_abs_logprob_diff"] == MINIMUMS["float32"]["mean_abs_logprob_diff"]
    assert low.thresholds["mean_abs_logprob_diff"].source == "minimum"
    high = calibrate({"trainer_vs_itself": floor(0.2)}, "bfloat16")
    assert high.values()["mean_abs_logprob_diff"] == CAPS["bfloat16"]["mean_abs_logprob_diff"]
    assert "lowered to the bfloat16 cap" in high.thresholds["mean_abs_logprob_diff"].rule
    gpu = calibrate({"trainer_vs_itself": floor(1e-7)}, "float32", on_gpu=True)
    assert gpu.values()["mean_abs_logprob_diff"] == MINIMUMS["float32@cuda"]["mean_abs_logprob_diff"]


@pytest.mark.unit
@pytest.mark.parametrize("dtype", list(CAPS))
def test_every_minimum_is_below_its_cap_and_factors_leave_headroom(dtype):
    for k, lo in MINIMUMS[dtype].items():
        assert 0 < lo < CAPS[dtype][k] and FIXED[dtype][k] <= CAPS[dtype][k]
    assert FACTOR["kl_k3"] == FACTOR["mean_abs_logprob_diff"] ** 2  # k3 ~ r^2 / 2


@pytest.mark.unit
def test_without_a_floor_the_fixed_values_are_used_and_said_so():
    for floors, why in (({}, "calibration off"), ({"dtype_rounding": "weights are bf16"}, "no floor measured")):
        c = calibrate(floors, "bfloat16")
        assert c.values() == FIXED["bfloat16"]
        assert all(why in c.thresholds[k].rule for k in ("mean_abs_logprob_diff", "kl_k3"))
        assert "fixed bfloat16 values" in c.summary


@pytest.mark.unit
def test_user_values_win_and_bit_exact_is_zero():
    c = calibrate({"trainer_vs_itself": floor(0.006)}, "bfloat16", user={"kl_k3": 1e-3, "mean_abs_logprob_diff": None})
    assert c.values()["kl_k3"] == 1e-3 and c.thresholds["kl_k3"].source == "user"
    assert c.thresholds["mean_abs_logprob_diff"].source == "calibrated"
    assert set(calibrate({"trainer_vs_itself": floor(0.006)}, "bfloat16", bit_exact=True).values().values()) == {0.0}


@pytest.mark.unit
def test_a_few_fold_gap_fails_the_calibrated_mismatch_check_but_not_the_fixed_one():
    # tiny model in bf16 on CPU: floor mean 0.0046 (trainer vs itself), healthy probe 0.0077, stale cache 0.030
    cal = calibrate({"trainer_vs_itself": floor(0.0046, p99=0.031, k3=2.8e-5)}, "bfloat16").values()
    fixed = calibrate({}, "bfloat16").values()
    healthy = floor(0.0077, p99=0.046, k3=7.7e-5, mx=0.067)
    stale = floor(0.030, p99=0.159, k3=1.1e-3, mx=0.25)
    assert mismatch_check(healthy, cal).passed and mismatch_check(healthy, fixed).passed
    assert not mismatch_check(stale, cal).passed and mismatch_check(stale, fixed).passed


@pytest.mark.unit
def test_the_table_shows_floor_threshold_and_rule():
    c = calibrate({"trainer_vs_itself": floor(0.006)}, "bfloat16")
    check = mismatch_check(floor(0.007), c.values())
    table = GateReport((check,), {}, c.to_dict()).table()
    assert "[limits: mean 0.024" in table and "4 x floor 0.006 (trainer_vs_itself)" in table
    assert "catastrophic cap for bfloat16" in table and check.threshold["mean_abs_logprob_diff"] == 0.024


def test_on_the_real_engine_calibration_names_a_few_fold_fault_the_fixed_values_let_through(make_trainer):
    import copy

    from trl_correct.testing.faults import run_with_faults

    trainer = make_trainer(bf16=True, use_cpu=True)
    base = copy.deepcopy(trainer.engine.settings)
    clean = trainer.full_gate()
    calibrated, fixed = trainer.gate.thresholds, calibrate({}, "bfloat16").values()
    assert clean.report.passed, clean.report.table()
    assert calibrated["mean_abs_logprob_diff"] < fixed["mean_abs_logprob_diff"], calibrated  # from the floors
    run = run_with_faults(trainer, ["stale_prefix_cache"], base)
    stale = run.report.mismatch
    assert mismatch_check(stale, fixed).passed, stale  # the fixed bf16 values let it through ...
    assert not mismatch_check(stale, trainer.gate.thresholds).passed, stale  # ... the calibrated ones do not
    assert "mismatch" in run.report.causes and "prefix_cache" in run.report.causes, run.report.table()
    ratio = stale["mean_abs_logprob_diff"] / clean.report.mismatch["mean_abs_logprob_diff"]
    print(f"\ncalibration on the real engine: clean mean {clean.report.mismatch['mean_abs_logprob_diff']:.3g}, stale "
          f"cache mean {stale['mean_abs_logprob_diff']:.3g} ({ratio:.1f}x); calibrated mean threshold "
          f"{trainer.gate.thresholds['mean_abs_logprob_diff']:.3g}, fixed {fixed['mean_abs_logprob_diff']:.3g}")
