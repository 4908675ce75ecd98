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
    assert trainer.last_sync_check.passed and trainer.engine.sync_count == 4
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
