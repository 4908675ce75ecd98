"""Bit-exact mode vs the default mode: is the mismatch exactly zero, and what does it cost per step?

    python bench/bit_exact.py [--model tiny] [--steps 12] [--repeats 3] [--bf16] [--no-append]

Rows (each its own process, interleaved, `--repeats` times):
- default: CorrectGRPOTrainer's defaults (TIS once the gate passes);
- bit_exact: `bit_exact: true` (vLLM's batch-invariant kernels, thresholds 0), `gate: observe` so the run
  reports its numbers even where the gate fails;
- bit_exact, VLLM_BATCH_INVARIANT=1 exported: the same with vLLM's switch forced on from the environment, to measure
  what vLLM itself does where trl-correct's support check says no (CPU).
Reported: the gate's verdict and causes, the probe's mean / max |Δlogp| and k3 KL, the worst training batch's max
|Δlogp|, and TRL's `step_time` (median from step 2 on, min / median / max over the repeats), relative to default.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import DOCS, append, run_child, single_process_env, step_times  # noqa: E402

MODES = {"default": ({}, {}), "bit_exact": (dict(bit_exact=True, gate="observe"), {}),
         "bit_exact, VLLM_BATCH_INVARIANT=1 exported": (dict(bit_exact=True, gate="observe"),
                                                         {"VLLM_BATCH_INVARIANT": "1"})}


def child(a) -> None:
    single_process_env()
    from models import model_dir
    from trl_correct import CorrectGRPOConfig, CorrectGRPOTrainer
    from trl_correct.tasks.tiny import keyword_reward, tiny_prompts
    from vs_stock import SHAPE

    overrides, _ = MODES[a.mode]
    import torch

    args = CorrectGRPOConfig(output_dir=tempfile.mkdtemp(), max_steps=a.steps, seed=a.seed, bf16=a.bf16,
                             use_cpu=not torch.cuda.is_available(), **dict(SHAPE, **overrides))
    out = dict(error=None)
    try:
        trainer = CorrectGRPOTrainer(model=str(model_dir(a.model)), reward_funcs=[keyword_reward], args=args,
                                     train_dataset=tiny_prompts())
        trainer.train()
    except Exception as e:  # what vLLM / torch do in this mode is the measurement
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    else:
        g = trainer.gate_report
        out.update(passed=g.passed, causes=[c.name for c in g.checks if not c.passed],
                   detail=next((c.detail for c in g.checks if c.name == "bit_exact"), ""),
                   probe={k: g.mismatch.get(k) for k in ("mean_abs_logprob_diff", "max_abs_logprob_diff", "kl_k3")},
                   steps_max=max(r["max_abs_logprob_diff"] for r in trainer.step_records),
                   step=statistics.median(step_times(trainer)),
                   batch_invariant=trainer.engine.facts().batch_invariant)
    with open(a.out, "w") as f:
        json.dump(out, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="bench/models.py name")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bf16", action="store_true", help="trainer autocast bf16 (engine bf16)")
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    out_dir = tempfile.mkdtemp(prefix="bit-exact-")
    runs = {m: [] for m in MODES}
    for rep in range(a.repeats):
        for mode, (_, env) in MODES.items():
            path = os.path.join(out_dir, f"{len(runs[mode])}-{list(MODES).index(mode)}.json")
            cmd = [__file__, "--child", "--mode", mode, "--model", a.model, "--steps", str(a.steps), "--seed",
                   str(rep), "--out", path] + (["--bf16"] if a.bf16 else [])
            runs[mode].append(run_child(cmd, path, f"{mode} run {rep}", env=dict(os.environ, **env)))
            print(mode, rep, runs[mode][-1], flush=True)
    rows = ["| mode | batch-invariant kernels | gate | causes | probe mean / max \\|Δ\\| | probe k3 KL "
            "| worst batch max \\|Δ\\| | step s: min / median / max | step vs default |",
            "|---|---|---|---|---|---|---|---|---|"]
    base = statistics.median(r["step"] for r in runs["default"] if r["error"] is None)
    for mode, rs in runs.items():
        r = rs[0]
        if r["error"]:
            rows.append(f"| {mode} | - | did not run | {r['error']} | | | | | |")
            continue
        steps = [x["step"] for x in rs]
        p = r["probe"]
        rows.append(f"| {mode} | {'on' if r['batch_invariant'] else 'off'} | {'PASS' if r['passed'] else 'FAIL'} | "
                    f"{', '.join(r['causes']) or '-'} | {p['mean_abs_logprob_diff']:.3g} / "
                    f"{p['max_abs_logprob_diff']:.3g} | {p['kl_k3']:.3g} | "
                    f"{max(x['steps_max'] for x in rs):.3g} | {min(steps):.3f} / {statistics.median(steps):.3f} / "
                    f"{max(steps):.3f} | {statistics.median(steps) / base:.2f}x |")
    reasons = sorted({r["detail"] for rs in runs.values() for r in rs if r.get("detail")})
    append(f"Bit-exact mode vs default ({'bf16' if a.bf16 else 'fp32'}, model {a.model})", "\n".join(rows),
           "Gate's bit_exact check said: " + " / ".join(reasons) if reasons else "", None if a.no_append else DOCS)


if __name__ == "__main__":
    main()
