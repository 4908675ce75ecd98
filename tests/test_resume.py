"""Stop and resume a real run: the gate's state travels with TRL's checkpoints, and a resumed run syncs and probes the
checkpoint's weights again before TIS comes back on (a saved 'TIS on' is never trusted blindly)."""

import json
from pathlib import Path

import pytest
import torch

from trl_correct import CorrectGRPOTrainer


class RecordsGatedWeights(CorrectGRPOTrainer):
    def run_gate(self):
        self.gated = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        return super().run_gate()


def test_resume_restores_gate_history_and_gates_the_checkpoint(make_trainer):
    first = make_trainer(max_steps=2, save_strategy="steps", save_steps=1)
    first.train()
    ckpt = Path(first.args.output_dir) / "checkpoint-2"
    saved = json.loads((ckpt / "correctness_state.json").read_text())
    assert saved["step"] == 2 and saved["tis_enabled"] and saved["gate"]["verdict"] == "pass"
    assert [r["step"] for r in saved["steps"]] == [0, 1] and saved["thresholds"] == first.gate.thresholds
    trained = {n: p.detach().clone() for n, p in first.model.named_parameters()}

    second = make_trainer(RecordsGatedWeights, max_steps=4, save_strategy="no")
    moved = max((second.model.get_parameter(n) - p).abs().max().item() for n, p in trained.items())
    assert moved > 1e-4  # a fresh trainer starts from the base weights, not the checkpoint's
    second.train(resume_from_checkpoint=str(ckpt))
    assert all(torch.equal(second.gated[n], p) for n, p in trained.items())  # the gate saw the checkpoint's weights
    assert second.gate_report.passed and second.gate_report.mismatch["max_abs_logprob_diff"] < 1e-4
    assert [r["step"] for r in second.step_records] == [0, 1, 2, 3] and all(r["tis_enabled"]
                                                                           for r in second.step_records)
    assert [r.to_dict() for r in second.resumes] == [{"from": str(ckpt), "step": 2, "saved_gate": "pass",
                                                      "saved_tis_enabled": True}]
    report = json.loads((Path(second.args.output_dir) / "correctness_report.json").read_text())
    assert report["resumes"][0]["step"] == 2 and len(report["steps"]) == 4


def test_resume_with_a_broken_engine_keeps_tis_off(make_trainer):
    first = make_trainer(max_steps=1, save_strategy="steps", save_steps=1)
    first.train()
    ckpt = Path(first.args.output_dir) / "checkpoint-1"
    resumed = make_trainer(max_steps=2, gate="warn", vllm_dtype="bfloat16")
    with pytest.warns(UserWarning, match="WITHOUT importance-sampling correction"):
        resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.resumes[0]["saved_tis_enabled"] is True  # it was on when saved...
    assert "dtype" in resumed.gate_report.causes and not resumed.tis_enabled  # ...and stays off after this gate
    assert [r["tis_enabled"] for r in resumed.step_records] == [True, False]


def test_resume_true_without_checkpoint_is_a_one_line_error(make_trainer):
    trainer = make_trainer()
    with pytest.raises(ValueError, match=r"^resume_from_checkpoint=True is invalid: no checkpoint in .*\n?") as e:
        trainer.train(resume_from_checkpoint=True)
    assert "\n" not in str(e.value)
