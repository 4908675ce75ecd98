"""The gate as a pure function of facts: every check is shown passing on clean facts and failing on a bad one."""

import json

import pytest

from trl_correct.gate import (Check, GateFailure, GateReport, clip_check, loss_audit_check, mismatch_check,
                              non_finite_check, reset_check, self_consistency_check, static_checks, temperature_check,
                              token_identity_check, weight_sync_check)

TRAINER = dict(compute_dtype="float32", head_dtype="float32", want_fp32_head=True, temperature=0.7)
ENGINE = dict(compute_dtype="float32", head_dtype="float32", head_dtype_supported=True,
              logprobs_mode="processed_logprobs", prefix_caching=False, reset_after_sync=True,
              async_scheduling=False, temperature=0.7, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
              presence_penalty=0.0, frequency_penalty=0.0, generation_config={})
THRESH = dict(mean_abs_logprob_diff=1e-4, max_abs_logprob_diff=2e-3, kl_k3=1e-6)
CLEAN = dict(mean_abs_logprob_diff=1e-6, p99_abs_logprob_diff=3e-6, max_abs_logprob_diff=5e-6, kl_k3=1e-12,
             n_tokens=100, n_nonfinite=0)


def causes(trainer=None, engine=None):
    checks = static_checks({**TRAINER, **(trainer or {})}, {**ENGINE, **(engine or {})})
    return [c.name for c in checks if not c.passed]


def test_clean_facts_pass_every_static_check():
    assert causes() == []


@pytest.mark.parametrize("engine,trainer,cause", [
    (dict(logprobs_mode="raw_logprobs"), None, "logprobs_mode"),
    (dict(compute_dtype="bfloat16", head_dtype="bfloat16"), None, "dtype"),
    (dict(head_dtype="bfloat16"), None, "lm_head_dtype"),
    (dict(head_dtype_supported=False), None, "lm_head_dtype"),
    (dict(top_k=5), None, "sampler"),
    (dict(temperature=1.0), None, "sampler"),
    (dict(repetition_penalty=1.1), None, "sampler"),
    (dict(min_p=0.05), None, "sampler"),
    (dict(top_p=0.9), None, "sampler"),
    (dict(prefix_caching=True, reset_after_sync=False), None, "prefix_cache"),
    (dict(async_scheduling=True), None, "async_scheduling"),
    (None, dict(dropout=["56 Dropout module(s) with p=0.05"]), "dropout"),
])
def test_each_static_fault_names_its_cause(engine, trainer, cause):
    assert cause in causes(trainer, engine)


def test_raw_logprobs_are_fine_at_t1_without_transforms():
    assert causes(dict(temperature=1.0), dict(logprobs_mode="raw_logprobs", temperature=1.0)) == []


def test_top_k_off_spellings_compare_equal():
    assert causes(engine=dict(top_k=-1)) == [] and causes(engine=dict(min_p=None)) == []


def test_prefix_cache_on_with_reset_passes():
    assert causes(engine=dict(prefix_caching=True, reset_after_sync=True)) == []


def test_generation_config_defaults_are_reported_not_failed():
    checks = static_checks(TRAINER, {**ENGINE, "generation_config": {"top_k": 20, "temperature": 0.6}})
    gc = next(c for c in checks if c.name == "generation_config")
    assert gc.passed and "top_k" in gc.detail


def test_weight_sync_check():
    assert weight_sync_check([], 3).passed
    c = weight_sync_check(["model.layers.1.mlp.*.weight"], 3)
    assert not c.passed and "model.layers.1.mlp" in c.detail and c.fix


@pytest.mark.parametrize("key,value", [("mean_abs_logprob_diff", 1e-3), ("max_abs_logprob_diff", 0.1),
                                       ("kl_k3", 1e-5), ("kl_k3", float("nan")), ("n_tokens", 0)])
def test_mismatch_check_fails_on_each_threshold(key, value):
    assert mismatch_check(CLEAN, THRESH).passed
    assert not mismatch_check({**CLEAN, key: value}, THRESH).passed


def test_report_is_data_and_failure_carries_it():
    r = GateReport((Check("dtype", False, "trainer float32, engine bfloat16", "fix it"), Check("sampler", True, "ok")),
                   {"n_tokens": 3})
    d = json.loads(json.dumps(r.to_dict()))
    assert d["verdict"] == "fail" and d["causes"] == ["dtype"] and d["checks"][0]["fix"] == "fix it"
    assert "FAIL dtype" in r.table() and "fix: fix it" in r.table()
    e = GateFailure(r)
    assert e.report is r and "dtype" in str(e)


def test_non_finite_is_its_own_cause_not_a_mismatch():
    assert mismatch_check({**CLEAN, "n_nonfinite": 3}, THRESH).passed  # the finite tokens are fine...
    c = non_finite_check(3)
    assert not c.passed and c.name == "non_finite_logprobs" and "3 token" in c.detail and c.fix
    assert non_finite_check(0).passed


def test_prefix_cache_reset_return_value_is_honoured():
    assert reset_check(True).passed and reset_check(None).passed
    c = reset_check(False)
    assert not c.passed and c.name == "prefix_cache_reset" and "returned False" in c.detail


def test_clip_share_above_the_limit_fails():
    assert clip_check(0.0, 0.2).passed and clip_check(0.2, 0.2).passed
    c = clip_check(0.6, 0.2)
    assert not c.passed and c.name == "ratio_clipped" and "60.0%" in c.detail
    assert not clip_check(float("nan"), 0.2).passed


@pytest.mark.parametrize("losses,grads,linear,ok", [
    ([-0.0, -1.0, -2.0], [0.0, 0.3, 0.6], True, True),        # TRL's loss: linear in the weights
    ([-1.0, -1.0, -1.0], [0.3, 0.3, 0.3], True, False),       # weights dropped (TRL #5031 / Liger #1082)
    ([-1.0, -2.0, -3.0], [0.3, 0.3, 0.3], True, False),       # loss moves, gradient does not (weights detached + added)
    ([0.0, -1.0, -4.0], [0.0, 0.3, 1.2], True, False),        # applied twice (w^2)
    ([0.0, -1.0, -4.0], [0.0, 0.3, 1.2], False, True),        # non-linear loss type (vespo): only "moves" is asked
    ([0.0, float("nan"), -2.0], [0.0, 0.3, 0.6], True, False),  # NaN loss
])
def test_loss_audit_check(losses, grads, linear, ok):
    c = loss_audit_check(losses, grads, scales=(0.0, 1.0, 2.0), linear=linear)
    assert c.passed is ok and c.name == "correction_not_applied", c.detail


def test_temperature_check_names_a_drift_that_vanishes_at_t1():
    clean, off = dict(CLEAN), {**CLEAN, "mean_abs_logprob_diff": 0.1, "max_abs_logprob_diff": 0.5, "kl_k3": 0.01}
    assert temperature_check(clean, clean, 0.7, THRESH).passed
    c = temperature_check(clean, off, 0.7, THRESH)
    assert not c.passed and c.name == "temperature" and "T=0.7" in c.detail
    assert temperature_check(off, off, 0.7, THRESH).passed  # off at T=1 too: some other cause
    assert temperature_check(clean, off, 0.7, THRESH, engine_ignores_t=True).passed  # raw logprobs: logprobs_mode


def test_token_identity_and_self_consistency_checks():
    assert token_identity_check(8, 0).passed
    c = token_identity_check(8, 2, "scored [1, 2], engine sampled [3]")
    assert not c.passed and c.name == "token_mismatch" and "2 of 8" in c.detail and "engine sampled" in c.detail
    assert self_consistency_check({**CLEAN, "batch_size": 8}, 1e-3).passed
    c = self_consistency_check({**CLEAN, "max_abs_logprob_diff": 0.3, "batch_size": 8}, 1e-3)
    assert not c.passed and c.name == "trainer_consistency" and "8 vs 1" in c.detail
