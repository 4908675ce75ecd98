"""Test helper, not part of the package: `trl-correct` that pauses at a chosen point, so a test can kill it there
deterministically.

    KILL_POINT=save KILL_POINT_STEP=4 KILL_POINT_FILE=/tmp/paused python tests/_kill_during_save.py train ...
    KILL_POINT=generate|optimizer KILL_POINT_AFTER=PATH KILL_POINT_FILE=/tmp/paused python ... train ...
    KILL_POINT=gate KILL_POINT_FILE=/tmp/paused python ... train ...

- save (the default when KILL_POINT_STEP is set): at the checkpoint of step KILL_POINT_STEP, after transformers has
  written the model (and trl-correct's certificate), the optimizer, scheduler and RNG state, and before
  trainer_state.json, correctness_state.json and the completion marker: the folder looks like a checkpoint (weights,
  optimizer) but is not a whole one.
- generate: in the engine's generation for a training batch, the first one once KILL_POINT_AFTER exists.
- optimizer: in the optimizer's step, the first one once KILL_POINT_AFTER exists.
- gate: in the gate's probe before step 0.
At the point the process writes where it is to KILL_POINT_FILE and sleeps. Without the variables it is plain
`trl-correct`.
"""

import os
import sys
import time


def _pause(where: str) -> None:
    flag = os.environ["KILL_POINT_FILE"]
    with open(flag + ".tmp", "w") as f:
        f.write(where)
    os.replace(flag + ".tmp", flag)
    time.sleep(3600)


def _after() -> bool:
    after = os.environ.get("KILL_POINT_AFTER")
    return after is None or os.path.exists(after)


def _pause_at(point: str) -> None:
    if point == "save":
        from transformers import Trainer

        step, save_rng_state = int(os.environ["KILL_POINT_STEP"]), Trainer._save_rng_state

        def paused(self, output_dir):
            save_rng_state(self, output_dir)
            if self.state.global_step == step:
                _pause(output_dir)

        Trainer._save_rng_state = paused
    elif point == "generate":
        from trl_correct.adapters.engine import Engine

        generate = Engine.generate

        def paused(self, *args, **kwargs):
            if _after():
                _pause("generate")
            return generate(self, *args, **kwargs)

        Engine.generate = paused
    elif point == "optimizer":
        import torch

        step = torch.optim.AdamW.step

        def paused(self, *args, **kwargs):
            if _after():
                _pause("optimizer")
            return step(self, *args, **kwargs)

        torch.optim.AdamW.step = paused
    elif point == "gate":
        from trl_correct.gate import Gate

        probe = Gate.probe

        def paused(self, *args, **kwargs):
            _pause("gate")
            return probe(self, *args, **kwargs)

        Gate.probe = paused
    else:
        raise SystemExit(f"KILL_POINT={point!r}: choose save, generate, optimizer or gate")


if __name__ == "__main__":
    point = os.environ.get("KILL_POINT") or ("save" if os.environ.get("KILL_POINT_STEP") else None)
    if point:
        _pause_at(point)
    from trl_correct.cli import main

    sys.exit(main(sys.argv[1:]))
