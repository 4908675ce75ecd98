"""Sleep mode's re-push inside generation is verified and its verdict reaches the gate.

Level-2 sleep (GPU colocate) discards the engine's weights after every generation, so `Engine.sample` pushes them
again before it generates. vLLM's CPU platform has no sleep mode, so the test drives that path directly: the engine is
told it sleeps (its sleep/wake calls only flip the flag), and the re-push leaves one weight stale. The batch of that
step must fail `weight_sync`, naming the weight, instead of the verification's answer being dropped.
"""

from transformers import TrainerCallback

from trl_correct.adapters.fingerprint import group_of
from trl_correct.testing.faults import _never_load, _standalone_weights, perturb_weights


def _pretend_sleep_mode(engine) -> None:
    """The engine behaves as under level-2 sleep: asleep until a weight load wakes it, asleep again after each
    generation (no memory is released: vLLM's CPU platform cannot)."""
    engine.settings.enable_sleep_mode = True
    engine.sleeping = True
    engine.sleep = lambda: setattr(engine, "sleeping", True)

    def wake_up(tags=None):
        if tags is None or "weights" in tags:
            engine.sleeping = False

    engine.wake_up = wake_up


def test_stale_repush_under_sleep_mode_fails_the_batch(make_trainer):
    trainer = make_trainer(max_steps=1, gate="observe")
    victim = _standalone_weights(trainer)[-1]

    class BreakRepush(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):  # after the start gate, before the batch
            _pretend_sleep_mode(trainer.engine)
            _never_load(trainer, victim)  # every later load streams everything but `victim`
            perturb_weights(trainer)  # ... which the trainer has moved: the engine's copy is stale

    trainer.add_callback(BreakRepush())
    trainer.train()
    assert trainer.gate_report.passed, trainer.gate_report.table()
    failed = [f for f in trainer.failures if f.when == "on the training batch at step 0"]
    assert failed and "weight_sync" in failed[0].report["causes"], [f.to_dict() for f in trainer.failures]
    detail = next(c["detail"] for c in failed[0].report["checks"] if c["name"] == "weight_sync")
    assert group_of(victim) in detail, detail
    assert not trainer.step_records[0].tis_enabled and not trainer.step_records[0].gate_passed
