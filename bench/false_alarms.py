"""Zero false alarms: clean runs must pass the gate and every step's batch checks under `gate: enforce`, on the model
and dtype users train, with the thresholds the gate calibrates; the fixed per-dtype values are judged on the same
figures for comparison.

    python bench/false_alarms.py [--model tiny|qwen2.5-0.5b|qwen3-0.6b|DIR] [--bf16] [--seeds 3] [--steps 7]
                                 [--completions 8] [--tokens 256] [--large 0] [--no-append]
                                 [--reuse DIR]

Each seed runs in its own process: build the trainer (CorrectGRPOTrainer defaults; T = 0.9; completions x tokens per
step), run the gate and `--steps` real GRPO steps under `gate: enforce` (a false alarm raises and is recorded). Then
every figure the gate decided on (probe, each batch) is also judged against the fixed per-dtype thresholds.
`--large N`: after seed 0's training, one more batch of N completions (same tokens each) through TRL's
generate-and-score and the per-step checks, no optimizer step: the decision at >= 1e5 scored tokens. Appends the table to docs/BENCHMARKS.md.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import DOCS, append, run_child, single_process_env  # noqa: E402

KEYS = ("mean_abs_logprob_diff", "p99_abs_logprob_diff", "kl_k3", "max_abs_logprob_diff")
SHORT = {"mean_abs_logprob_diff": "mean", "p99_abs_logprob_diff": "p99", "kl_k3": "k3", "max_abs_logprob_diff": "max"}


def child(a) -> None:
    single_process_env()
    import torch
    from models import model_dir

    from trl_correct import CorrectGRPOConfig, CorrectGRPOTrainer, GateFailure
    from trl_correct.core.calibrate import calibrate
    from trl_correct.tasks.tiny import keyword_reward, tiny_prompts

    path = str(model_dir(a.model)) if not os.path.isdir(a.model) else a.model
    args = CorrectGRPOConfig(
        output_dir=tempfile.mkdtemp(), bf16=a.bf16, use_cpu=not torch.cuda.is_available(), max_steps=a.steps,
        seed=a.seed, per_device_train_batch_size=a.completions, num_generations=min(4, a.completions),
        max_completion_length=a.tokens, temperature=0.9, learning_rate=1e-5 if "qwen" in a.model else 1e-3,
        beta=0.0, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, gate="enforce",
        vllm_kv_cache_gib=a.kv_gib, model_init_kwargs={"dtype": "float32"})

    class Trainer(CorrectGRPOTrainer):
        def engine_settings(self):  # room for the large batch in one engine pass
            s = super().engine_settings()
            s.max_num_seqs = max(s.max_num_seqs, a.large)
            return s

    trainer = Trainer(model=path, reward_funcs=[keyword_reward], args=args, train_dataset=tiny_prompts())
    alarm = None
    try:
        trainer.train()
    except GateFailure as e:
        alarm = {"step": trainer.state.global_step, "causes": e.report.causes, "detail": e.report.table()}
    steps, large = [r.to_dict() for r in trainer.step_records], None
    if a.large and alarm is None and a.seed == 0:
        trainer.model.train()
        rows = tiny_prompts().select(range(a.large // 4))
        prompts = [{"prompt": r["prompt"]} for r in rows for _ in range(4)]  # 4 completions per prompt, grouped
        trainer._last_loaded_step = -1  # a fresh sync, as a new step would
        try:
            trainer._generate_and_score_completions(prompts)
            large = trainer.step_records[-1].to_dict()
        except GateFailure as e:
            alarm = {"step": "large", "causes": e.report.causes, "detail": e.report.table()}
    fixed = calibrate({}, trainer.compute_dtype, trainer.on_gpu).values()
    report = trainer.gate_report
    out = dict(seed=a.seed, alarm=alarm, thresholds=trainer.gate.thresholds, fixed=fixed,
               calibration=trainer.gate.calibration.to_dict(), probe=report.mismatch if report else None,
               steps=steps, large=large)
    with open(a.out, "w") as f:
        json.dump(out, f, default=str)


def over(stats: dict, thresholds: dict) -> list[str]:
    return [SHORT[k] for k in KEYS if stats[k] > thresholds[k]]


def figures(stats: dict | None) -> str:
    return " / ".join(f"{stats[k]:.3g}" if stats else "-" for k in KEYS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--completions", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--large", type=int, default=0, help="completions of one extra, large batch (0: none)")
    ap.add_argument("--kv_gib", type=float, default=4.0)
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--reuse", help="a directory of earlier seeds' results (N.json): those seeds are not run again")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    tmp = a.reuse or tempfile.mkdtemp(prefix="false-alarms-")
    print(f"results in {tmp}", flush=True)
    flags = ["--model", a.model, "--steps", str(a.steps), "--completions", str(a.completions), "--tokens",
             str(a.tokens), "--large", str(a.large), "--kv_gib", str(a.kv_gib), *(["--bf16"] if a.bf16 else [])]
    runs = []
    for seed in range(a.seeds):
        path = os.path.join(tmp, f"{seed}.json")
        if os.path.exists(path):
            with open(path) as f:
                runs.append(json.load(f))
        else:
            runs.append(run_child([__file__, "--child", "--seed", str(seed), "--out", path, *flags], path,
                                  f"seed {seed}"))
        r = runs[-1]
        print(f"seed {seed}: {'FALSE ALARM ' + str(r['alarm']['causes']) if r['alarm'] else 'clean'}; "
              f"{len(r['steps'])} batches", flush=True)
    dtype = "bf16" if a.bf16 else "fp32"
    batches = [s for r in runs for s in r["steps"]]
    probes = [r["probe"] for r in runs if r["probe"]]
    alarms = [r["alarm"] for r in runs if r["alarm"]]
    fixed = runs[0]["fixed"]
    rows = [f"| seed | calibrated thresholds (mean / p99 / k3 / max) | probe: mean / p99 / k3 / max | batches | "
            f"worst batch: mean / p99 / k3 / max | calibrated verdict | fixed {dtype} values would fail |",
            "|---|---|---|---|---|---|---|"]
    for r in runs:
        th, p = r["thresholds"], r["probe"] or {}
        worst = {k: max((s[k] for s in r["steps"]), default=float("nan")) for k in KEYS}
        fixed_fail = sorted({x for s in [p, *r["steps"]] if s for x in over(s, fixed)})
        verdict = (f"FALSE ALARM at step {r['alarm']['step']}: {', '.join(r['alarm']['causes'])}" if r["alarm"]
                   else "pass")
        rows.append(f"| {r['seed']} | {figures(th)} | {figures(p or None)} | {len(r['steps'])} | "
                    f"{figures(worst) if r['steps'] else '-'} | {verdict} | {', '.join(fixed_fail) or '-'} |")
    notes = [f"Model `{a.model}`, {dtype}, T = 0.9, {a.completions} completions x {a.tokens} tokens per step, "
             f"{a.steps} steps per seed: {len(batches)} clean batches over {a.seeds} seeds, false alarms under "
             f"`gate: enforce`: **{len(alarms)}**. Fixed {dtype} values: "
             + " / ".join(f"{fixed[k]:.3g}" for k in KEYS) + "."]
    if batches:
        med = {k: statistics.median(s[k] for s in batches) for k in KEYS}
        share = {k: max(s[k] / r["thresholds"][k] for r in runs for s in r["steps"]) for k in KEYS}
        notes.append("Median batch: " + ", ".join(f"{SHORT[k]} {med[k]:.3g}" for k in KEYS) + "; batch / threshold "
                     "at its worst: " + ", ".join(f"{SHORT[k]} {share[k]:.2f}" for k in KEYS) + ".")
    larges = [(r["seed"], r["large"]) for r in runs if r["large"]]
    for seed, s in larges:
        bad = over(s, runs[seed]["thresholds"])
        notes.append(f"Large batch (seed {seed}): {s['n_tokens']:,} scored tokens in one step: "
                     + ", ".join(f"{SHORT[k]} {s[k]:.3g}" for k in KEYS)
                     + f" — {'FAILS ' + ', '.join(bad) if bad else 'passes'} the calibrated thresholds (fixed values: "
                       f"{', '.join(over(s, fixed)) or 'pass'}).")
    if probes:
        notes.append("Floors the thresholds came from, per seed: " + "; ".join(
            ", ".join(f"{n} mean {f['mean_abs_logprob_diff']:.3g}" for n, f in r["calibration"]["floors"].items()
                      if isinstance(f, dict)) for r in runs) + ".")
    append(f"False alarms at real shape: {a.model}, {dtype}", "\n".join(rows), "\n".join(notes),
           None if a.no_append else DOCS)


if __name__ == "__main__":
    main()
