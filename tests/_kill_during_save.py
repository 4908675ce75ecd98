"""Test helper, not part of the package: `trl-correct` with a pause in the middle of one checkpoint write, so a test
can kill -9 it there deterministically.

    KILL_POINT_STEP=4 KILL_POINT_FILE=/tmp/paused python tests/_kill_during_save.py train --config ... [flags]

At the checkpoint of step KILL_POINT_STEP, after transformers has written the model (and trl-correct's certificate),
the optimizer, scheduler and RNG state, and before trainer_state.json, correctness_state.json and the completion
marker, the process writes the folder's path to KILL_POINT_FILE and sleeps: the folder then looks like a checkpoint
(weights, optimizer) but is not a whole one. Without the two variables it is plain `trl-correct`.
"""

import os
import sys
import time

from transformers import Trainer


def _pause_in_the_middle_of_a_save() -> None:
    step, flag = int(os.environ["KILL_POINT_STEP"]), os.environ["KILL_POINT_FILE"]
    save_rng_state = Trainer._save_rng_state

    def paused(self, output_dir):
        save_rng_state(self, output_dir)
        if self.state.global_step == step:
            with open(flag + ".tmp", "w") as f:
                f.write(output_dir)
            os.replace(flag + ".tmp", flag)
            time.sleep(3600)

    Trainer._save_rng_state = paused


if __name__ == "__main__":
    if os.environ.get("KILL_POINT_STEP"):
        _pause_in_the_middle_of_a_save()
    from trl_correct.cli import main

    sys.exit(main(sys.argv[1:]))
