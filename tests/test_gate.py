"""The gate as a pure function of facts: every check is shown passing on clean facts and failing on a bad one."""

import json

import pytest

from trl_correct.gate import Check, GateFailure, GateReport, mismatch_check, static_checks, weight_sync_check

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
                                       ("kl_k3", 1e-5), ("kl_k3", float("nan")), ("n_nonfinite", 1),
                                       ("n_tokens", 0)])
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
