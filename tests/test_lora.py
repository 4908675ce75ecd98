"""LoRA (use_peft) on the real engine: the engine receives base + adapter deltas every step, the gate's fingerprint
and probe cover it, and parity holds after several real LoRA updates that move the policy far more than the gap."""

import pytest
from peft import LoraConfig

from conftest import train_and_measure
from trl_correct import GateFailure

FP32_TOL = 1e-4


def lora(dropout=0.0):
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM")


def test_lora_parity_holds_after_updates(make_trainer):
    trainer = make_trainer(peft_config=lora(), max_steps=4, learning_rate=5e-3)
    moved, gaps = train_and_measure(trainer)
    assert trainer.gate_report.passed and not trainer.failures and len(gaps) == 4
    assert max(gaps) < FP32_TOL and moved > 100 * max(gaps), (moved, gaps)
    assert trainer.gate.last_sync_check.passed and trainer.engine.sync_count == 4
    names = [n for n, _ in trainer.engine_weights()]
    assert "model.layers.0.self_attn.q_proj.weight" in names and not any("lora_" in n for n in names)


def test_lora_dropout_is_named_before_training(make_trainer):
    # TRL's default lora_dropout (0.05) makes the trainer's logprobs random draws once the adapter is non-zero
    # (measured here after one update: mean |Δ| 0.010 against 1e-6 without dropout)
    trainer = make_trainer(peft_config=lora(dropout=0.05))
    with pytest.raises(GateFailure) as e:
        trainer.train()
    assert e.value.report.causes == ["dropout"]
    assert "p=0.05" in next(c.detail for c in e.value.report.checks if c.name == "dropout")


def test_lora_out_of_the_box_from_the_command_line(tmp_path):
    # the command: no lora_dropout given, so trl-correct uses 0 (TRL's ModelConfig default 0.05 would be named
    # `dropout` by the gate and stop the run)
    from trl_correct.train import build_trainer

    trainer = build_trainer(["--config", "recipes/tiny.yaml", "--use_peft", "true", "--lora_r", "8",
                             "--lora_target_modules", "all-linear", "--learning_rate", "1e-2", "--max_steps", "4",
                             "--output_dir", str(tmp_path)])
    try:
        trainer.train()
        assert trainer.gate_report.passed, trainer.gate_report.table()
        gaps = [r["max_abs_logprob_diff"] for r in trainer.step_records]
        assert len(gaps) == 4 and all(r["tis_enabled"] for r in trainer.step_records) and max(gaps) < FP32_TOL, gaps
    finally:
        trainer.engine.close()


@pytest.mark.unit
def test_an_explicit_lora_dropout_is_kept(tmp_path):
    from trl_correct.train import given

    recipe = tmp_path / "r.yaml"
    recipe.write_text("use_peft: true\nlora_dropout: 0.05\n")
    assert given(["--config", str(recipe)], "lora_dropout") and given(["--lora_dropout=0.1"], "lora_dropout")
    assert given(["--lora_dropout", "0.1"], "lora_dropout") and not given(["--config", "recipes/tiny.yaml"],
                                                                        "lora_dropout")
