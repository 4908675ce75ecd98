"""Extension through subclassing, as the README shows it: a custom gate check, custom probe prompts (see also
test_engine_parity.py::test_subclass_hooks_from_readme) and a custom correction — each on the real engine."""

import pytest
import torch

from trl_correct import Check, CorrectGRPOTrainer, GateFailure


class LengthCheck(CorrectGRPOTrainer):
    """The README's custom check: every probe completion must be at least `min_len` tokens long."""

    def extra_checks(self, probe):
        short = sum(len(c) < self.min_len for c in probe.completion_ids)
        return [Check("probe_length", not short, f"{short} probe completion(s) shorter than {self.min_len} tokens",
                      "raise max_completion_length")]


def test_custom_check_blocks_tis_with_its_own_cause(make_trainer):
    trainer = make_trainer(LengthCheck)
    trainer.min_len = 1
    report = trainer.run_gate()
    assert report.passed and report.checks[-1].name == "probe_length", report.table()
    trainer.min_len = 10_000  # no completion is that long: the check fails, named by its own cause
    with pytest.raises(GateFailure) as e:
        trainer.train()
    assert e.value.report.causes == ["probe_length"] and not trainer.tis_enabled


class SoftCap(CorrectGRPOTrainer):
    """The README's custom correction: per-token ratios squashed smoothly into (0, 2) instead of truncated."""

    def correction(self, trainer_logprobs, engine_logprobs, mask):
        r = (trainer_logprobs - engine_logprobs).float().nan_to_num(0.0) * mask
        w = 2 * torch.sigmoid(2 * r)  # = 1 at r = 0, slope 1 there, saturates at 2
        return w, torch.zeros_like(mask, dtype=torch.bool)

    def _compute_loss(self, model, inputs):
        if not self.in_gate:  # training batches, not the gate's loss audit
            self.applied = getattr(self, "applied", []) + [(inputs["importance_sampling_ratio"],
                                                            inputs["old_per_token_logps"],
                                                            inputs["sampling_per_token_logps"], inputs["completion_mask"])]
        return super()._compute_loss(model, inputs)


def test_custom_correction_reaches_the_loss(make_trainer):
    trainer = make_trainer(SoftCap, max_steps=2)
    trainer.train()
    audit = next(c for c in trainer.gate_report.checks if c.name == "correction_not_applied")
    assert audit.passed and trainer.tis_enabled
    for w, old, sampled, mask in trainer.applied:
        expected = 2 * torch.sigmoid(2 * ((old - sampled).float() * mask))
        assert torch.equal(w, expected)
        assert (w[mask.bool()] != 1.0).any()
