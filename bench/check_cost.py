"""How trl-correct's own cost grows: the gate and the per-step checks at three batch sizes and two vocab sizes.

    python bench/check_cost.py [--models tiny,tiny-v152k] [--sizes 8x32,16x64,32x128] [--steps 5] [--no-append]
                               [--bf16] [--verify on|off|both] [--probe batch|default]

For each model (bench/models.py: the tiny model, vocab 1,024, and the same body with Qwen2.5's 151,936-token vocab)
and each batch (completions x max tokens per step), one process trains `--steps` GRPO steps of CorrectGRPOTrainer with
its defaults and measures, from step 2 on:
- step: TRL's `step_time` (generation, sync, scoring, checks, backward), median;
- checks: trl-correct's own per-step work, split into the batch checks + metrics (what CorrectGRPOTrainer adds around
  TRL's generate-and-score: token identity, mismatch/ratio statistics, TIS weights, gathers) and the weight-sync
  verification (trainer- and engine-side fingerprints), as in bench/vs_stock.py; the weight push itself (streaming
  the weights into the engine, which stock TRL does too) is its own column, in neither;
- gate: one full gate (sync, static checks, probe at T and at a second temperature, loss audit, self-consistency,
  token identity of a dry batch) with the probe sized like the batch (probe_size = completions, probe_tokens = max
  tokens), median of 2 runs after training; with `--probe default` the gate keeps its default probe, and the gate
  before step 0 (with the floors it calibrates from) is timed as well.
`--verify both` runs every row twice, with the weight-sync verification on and off (`verify_weight_sync`), so its cost
shows in the step time too, not only in the instrumented share. Real shape: `--models qwen2.5-0.5b --sizes 8x128
--steps 4 --bf16 --verify both --probe default`.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import DOCS, append, instrument, own_work_per_step, run_child, single_process_env, step_times  # noqa: E402


def child(a) -> None:
    single_process_env()
    from models import model_dir
    from trl_correct import CorrectGRPOConfig, CorrectGRPOTrainer
    from trl_correct.tasks.tiny import keyword_reward, tiny_prompts
    from vs_stock import SHAPE

    n, t = (int(x) for x in a.size.split("x"))
    cost = {}
    snaps = instrument(cost)
    import torch

    shape = dict(SHAPE, per_device_train_batch_size=n, max_completion_length=t)
    if "qwen" in a.model:
        shape["learning_rate"] = 1e-5
    probe = dict(probe_size=n, probe_tokens=t) if a.probe == "batch" else {}
    args = CorrectGRPOConfig(output_dir=tempfile.mkdtemp(), max_steps=a.steps, seed=0, bf16=a.bf16,
                             use_cpu=not torch.cuda.is_available(), verify_weight_sync=a.verify == "on",
                             model_init_kwargs={"dtype": "float32"}, **probe, **shape)

    class Trainer(CorrectGRPOTrainer):
        def run_gate(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return super().run_gate(*args, **kwargs)
            finally:
                self.gate_times = [*getattr(self, "gate_times", []), time.perf_counter() - t0]

    trainer = Trainer(model=str(model_dir(a.model)), reward_funcs=[keyword_reward], args=args,
                      train_dataset=tiny_prompts())
    trainer.train()
    first_gate = trainer.gate_times[0]
    own = own_work_per_step(cost, snaps)  # before the gate runs below: their syncs are not training steps
    gate = []
    for _ in range(2):
        t0 = time.perf_counter()
        report = trainer.run_gate()
        gate.append(time.perf_counter() - t0)
        assert report.passed, report.table()
    with open(a.out, "w") as f:
        json.dump(dict(step=statistics.median(step_times(trainer)), batch=own["batch"], sync=own["sync"],
                       load=own["load"], raw={k: own[k] for k in ("ours", "trl", "push", "tap", "verify") if k in own},
                       first_gate=first_gate, verify=a.verify,
                       tokens=statistics.mean(r["n_tokens"] for r in trainer.step_records[2:]),
                       gate=statistics.median(gate), params=sum(p.numel() for p in trainer.model.parameters()),
                       vocab=trainer.model.config.vocab_size), f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,tiny-v152k")
    ap.add_argument("--sizes", default="8x32,16x64,32x128", help="completions x max tokens per step")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--verify", choices=("on", "off", "both"), default="on")
    ap.add_argument("--probe", choices=("batch", "default"), default="batch")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.steps < 3:
        ap.error(f"--steps {a.steps}: steps 0-1 are not timed (compile, first sync), so at least 3 are needed")
    if a.child:
        return child(a)
    out_dir = tempfile.mkdtemp(prefix="check-cost-")
    gate_col = "gate s (probe = batch)" if a.probe == "batch" else "gate s (default probe)"
    rows = ["| model | vocab | params | batch (completions x max tokens) | sync verification | scored tokens / step "
            f"| step s | batch checks ms | sync verify ms | checks % of step | weight push ms | gate before step 0 s "
            f"| {gate_col} |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    extra = ["--probe", a.probe, *(["--bf16"] if a.bf16 else [])]
    for model in a.models.split(","):
        for size in a.sizes.split(","):  # the first child builds the model if it is not cached yet
            for verify in (("on", "off") if a.verify == "both" else (a.verify,)):
                path = os.path.join(out_dir, f"{model}-{size}-{verify}.json")
                r = run_child([__file__, "--child", "--model", model, "--size", size, "--steps", str(a.steps),
                               "--verify", verify, "--out", path, *extra], path, f"{model} {size} verify {verify}")
                checks = r["batch"] + r["sync"]
                rows.append(f"| {model} | {r['vocab']:,} | {r['params'] / 1e6:.2f}M | {size} | {verify} | "
                            f"{r['tokens']:.0f} | {r['step']:.3f} | {1e3 * r['batch']:.2f} | {1e3 * r['sync']:.2f} | "
                            f"{100 * checks / r['step']:.1f} % | {1e3 * r['load']:.2f} | {r['first_gate']:.2f} | "
                            f"{r['gate']:.2f} |")
                print(rows[-1], flush=True)
    dtype = "bf16" if a.bf16 else "fp32"
    append("Cost of the gate and the per-step checks vs batch and vocab size", "\n".join(rows),
           f"{a.steps} GRPO steps per row (steps 0-1 not timed), recipes/tiny.yaml otherwise (T = 0.9, {dtype}).",
           None if a.no_append else DOCS)


if __name__ == "__main__":
    main()
