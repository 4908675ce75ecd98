"""Zero false alarms: the clean recipe must pass the gate (and every step's batch check) on every seed; printed
beside the weakest detected fault so the threshold margin is visible.

    python bench/false_alarms.py [--config recipes/tiny.yaml] [--seeds 10] [--steps 5]

For each seed: build the recipe's trainer, run the gate and `--steps` real GRPO steps under gate=enforce (any false
alarm raises). Then, on seed 0, every fault of faults.py is injected and its probe figures recorded. Prints one
markdown table; append it to docs/BENCHMARKS.md with the command and versions.
"""

import argparse
import os
import platform
import tempfile

from trl_correct.faults import FAULTS, run_with_faults
from trl_correct.train import build_trainer

KEYS = ("mean_abs_logprob_diff", "max_abs_logprob_diff", "kl_k3")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="recipes/tiny.yaml")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    out = tempfile.mkdtemp(prefix="false-alarms-")
    worst = {k: 0.0 for k in KEYS}
    worst_floor = 0.0
    passed = 0
    thresholds = None
    for seed in range(a.seeds):
        t = build_trainer(["--config", a.config, "--seed", str(seed), "--max_steps", str(a.steps),
                           "--output_dir", os.path.join(out, str(seed)), "--gate", "enforce"])
        t.train()  # raises GateFailure on any false alarm, before or during training
        thresholds = t.thresholds
        figures = [t.gate_report.mismatch] + t.step_records
        for k in KEYS:
            worst[k] = max(worst[k], max(f[k] for f in figures))
        worst_floor = max(worst_floor, t.last_self_consistency["max_abs_logprob_diff"])
        passed += t.gate_report.passed and not t.failures
        print(f"seed {seed}: gate {'PASS' if t.gate_report.passed else 'FAIL'}, step failures {len(t.failures)}, "
              f"worst max |Δ| {max(f['max_abs_logprob_diff'] for f in figures):.3g}", flush=True)
        base = t.engine.settings
        faults = {}
        if seed == 0:
            for name, fault in FAULTS.items():
                if fault.trainer_flags or fault.applicable(t):  # needs another trainer, or cannot show here
                    continue
                rep = run_with_faults(t, [name], base)
                faults[name] = (rep.mismatch, FAULTS[name].cause in rep.causes)
            fault_rows = faults
        del t.engine.llm
    print(f"\nclean runs passing gate and every step check: {passed}/{a.seeds} "
          f"({a.steps} steps each, {platform.machine()}, {os.cpu_count()} cores)\n")
    print("| figure | threshold | worst clean (all seeds, probe + steps) | " +
          " | ".join(fault_rows) + " |")
    print("|---|---|---|" + "---|" * len(fault_rows))
    for k in KEYS:
        cells = [f"{m[k]:.3g}{'' if hit else ' (not detected)'}" for m, hit in fault_rows.values()]
        print(f"| {k} | {thresholds[k]:.3g} | {worst[k]:.3g} | " + " | ".join(cells) + " |")
    # faults that leave the probe's logprobs at the floor are named by their own check, not by these margins
    weakest = {k: min(m[k] for name, (m, _) in fault_rows.items() if FAULTS[name].moves_probe) for k in KEYS}
    print(f"\nworst clean trainer self-consistency (max |Δ|, batch vs 1): {worst_floor:.3g}; every fault named by its "
          f"own cause: {all(hit for _, hit in fault_rows.values())}")
    print("margin over the faults that move the probe (weakest fault / threshold, threshold / worst clean): " +
          ", ".join(f"{k}: {weakest[k] / thresholds[k]:.3g}x / {thresholds[k] / max(worst[k], 1e-30):.3g}x"
                    for k in KEYS))


if __name__ == "__main__":
    main()
