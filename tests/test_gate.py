"""The gate as a pure function of facts: every check is shown passing on clean facts and failing on a bad one."""

import json
from dataclasses import replace

import pytest

from trl_correct.core.facts import EngineFacts, TrainerFacts, TransformersBackend
from trl_correct.core.checks import (STATIC_CHECKS, Check, GateFailure, GateReport, clip_check, loss_audit_check,
                              mismatch_check, non_finite_check, reset_check, self_consistency_check, static_checks,
                              temperature_check, token_identity_check, weight_sync_check)
from trl_correct.core.sampler import SamplerSpec

pytestmark = pytest.mark.unit  # builds no engine, starts no subprocess (tests/conftest.py)

SAMPLER = SamplerSpec(temperature=0.7)
TRAINER = TrainerFacts(compute_dtype="float32", head_dtype="float32", fp32_lm_head=True, sampler=SAMPLER)
ENGINE = EngineFacts(compute_dtype="float32", head_dtype="float32", logprobs_mode="processed_logprobs", sampler=SAMPLER)
THRESH = dict(mean_abs_logprob_diff=1e-4, p99_abs_logprob_diff=1e-3, max_abs_logprob_diff=2e-3, kl_k3=1e-6)
CLEAN = dict(mean_abs_logprob_diff=1e-6, p99_abs_logprob_diff=3e-6, max_abs_logprob_diff=5e-6, kl_k3=1e-12,
             n_tokens=100, n_nonfinite=0)
# a model vLLM serves through its Transformers backend on a vLLM whose compile decorator was not read
UNVERIFIED_BACKEND = TransformersBackend("Olmo2ForCausalLM", "TransformersForCausalLM", ("Olmo2Model",),
                                         "vLLM 9.9's compile decorator has not been read")
SAMPLER_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                "frequency_penalty")


def facts(base, changes):
    """`base` with `changes`; sampler fields go into its SamplerSpec."""
    changes = dict(changes or {})
    sampler = {k: changes.pop(k) for k in list(changes) if k in SAMPLER_KEYS}
    return replace(base, **changes, **({"sampler": replace(base.sampler, **sampler)} if sampler else {}))


def causes(trainer=None, engine=None):
    checks = static_checks(facts(TRAINER, trainer), facts(ENGINE, engine))
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
    (None, dict(dropout=("56 Dropout module(s) with p=0.05",)), "dropout"),
    (None, dict(sampler_unsupported="the model rescales its logits (logit_scale)"), "sampler"),
    (dict(sampler=SamplerSpec(temperature=0.7, order=("unverified: vLLM 9.9",))), None, "sampler"),
    (dict(unreproduced={"logit_bias": {5: 3.0}}), None, "sampler"),
    (None, dict(sampler_defaults_applied={"top_k": 20}), "generation_config"),
    (dict(transformers_backend=UNVERIFIED_BACKEND), None, "architecture"),
    (dict(transformers_backend=TransformersBackend("Olmo2ForCausalLM", "TransformersForCausalLM", ("Olmo2Model",))),
     None, None),
    (dict(head_dtype="bfloat16", compute_dtype="bfloat16"), dict(fp32_lm_head=False, head_dtype="bfloat16",
                                                                 compute_dtype="bfloat16"), None),
])
def test_each_static_fault_names_its_cause(engine, trainer, cause):
    if cause is None:  # a consistent non-default setup: nothing fails
        assert causes(trainer, engine) == []
    else:
        assert cause in causes(trainer, engine)


def test_every_static_check_is_shown_failing():
    failed = {c for case in STATIC_FAILURES for c in causes(*case)}
    names = {f.__name__.removeprefix("check_") for f in STATIC_CHECKS}  # each check's cause is its function's name
    assert names <= failed, names - failed


STATIC_FAILURES = [(None, dict(logprobs_mode="raw_logprobs")), (None, dict(compute_dtype="bfloat16")),
                   (None, dict(head_dtype="bfloat16")), (None, dict(top_k=5)),
                   (dict(sampler_defaults_applied={"top_k": 20}), None),
                   (None, dict(prefix_caching=True, reset_after_sync=False)), (dict(dropout=("p=0.1",)), None),
                   (dict(bit_exact=True), dict(batch_invariant_unsupported="no CUDA GPU")),
                   (None, dict(async_scheduling=True)), (None, dict(transformers_backend=UNVERIFIED_BACKEND)),
                   (dict(attention_dropped="attention soft-capping 50 is ignored by attn_implementation=sdpa"), None)]


def test_raw_logprobs_are_fine_at_t1_without_transforms():
    assert causes(dict(temperature=1.0), dict(logprobs_mode="raw_logprobs", temperature=1.0)) == []


def test_top_k_off_spellings_compare_equal():
    assert causes(engine=dict(top_k=-1)) == [] and causes(engine=dict(min_p=None)) == []


def test_prefix_cache_on_with_reset_passes():
    assert causes(engine=dict(prefix_caching=True, reset_after_sync=True)) == []


def test_generation_config_defaults_are_reported_not_failed():
    checks = static_checks(TRAINER, replace(ENGINE, generation_config={"top_k": 20, "temperature": 0.6}))
    gc = next(c for c in checks if c.name == "generation_config")
    assert gc.passed and "top_k" in gc.detail


def test_generation_config_default_applied_on_one_side_fails():
    # sampler_defaults=model put the model's top_k 20 into the trainer's sampler; an engine built without it
    trainer = replace(TRAINER, sampler_defaults_applied={"top_k": 20}, sampler=replace(SAMPLER, top_k=20))
    checks = {c.name: c for c in static_checks(trainer, ENGINE)}
    gc = checks["generation_config"]
    assert not gc.passed and "engine uses {'top_k': 0}" in gc.detail and "engine_settings" in gc.fix


def test_weight_sync_check():
    assert weight_sync_check([], 3).passed
    c = weight_sync_check(["model.layers.1.mlp.*.weight"], 3)
    assert not c.passed and "model.layers.1.mlp" in c.detail and c.fix


@pytest.mark.parametrize("key,value", [("mean_abs_logprob_diff", 1e-3), ("p99_abs_logprob_diff", 0.01),
                                       ("max_abs_logprob_diff", 0.1), ("kl_k3", 1e-5), ("kl_k3", float("nan")),
                                       ("n_tokens", 0)])
def test_mismatch_check_fails_on_each_threshold(key, value):
    assert mismatch_check(CLEAN, THRESH).passed
    c = mismatch_check({**CLEAN, key: value}, THRESH)
    assert not c.passed and c.threshold == THRESH and set(c.measured) == set(THRESH)


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
    caps = dict(mean_abs_logprob_diff=5e-3, p99_abs_logprob_diff=2e-2, max_abs_logprob_diff=0.1)
    assert self_consistency_check({**CLEAN, "batch_size": 8}, caps).passed
    c = self_consistency_check({**CLEAN, "max_abs_logprob_diff": 0.3, "batch_size": 8}, caps)
    assert not c.passed and c.name == "trainer_consistency" and "8 vs 1" in c.detail and "max 0.3 > 0.1" in c.detail


def test_attention_that_drops_softcapping_is_named():
    from trl_correct.adapters.audit import attention_dropped

    class Cfg:
        attn_logit_softcapping, _attn_implementation = 50.0, "sdpa"

        def get_text_config(self):
            return self

    class Model:
        config = Cfg()

    why = attention_dropped(Model())
    assert "attn_implementation=sdpa" in why and "50" in why
    Model.config._attn_implementation = "eager"
    assert attention_dropped(Model()) is None
    c = {c.name: c for c in static_checks(replace(TRAINER, attention_dropped=why), ENGINE)}["attention"]
    assert not c.passed and "eager" in c.fix
    assert "attention" not in {c.name for c in static_checks(TRAINER, ENGINE)}  # nothing to drop: no row
