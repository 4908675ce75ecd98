"""The per-step decision does not grow with the batch: the same healthy run judged at ~1e3 and ~1e5 scored tokens per
step, and each fault that moves the probe injected mid-run at both sizes.

    python bench/batch_scaling.py [--model qwen2-rand-2m] [--sizes 8x128,512x200] [--steps 3] [--bf16] [--no-append]

For each size (completions x max tokens per step) one process per run: the gate (calibrated thresholds) and `--steps`
GRPO steps under `gate: observe` (nothing stops the run; every batch's figures are recorded). Healthy: no fault. Then
each fault of faults.py that moves the probe and shows in training batches is injected at step 1
(`faults.inject(at_step=1)`) with the weight fingerprint off (`verify_weight_sync: false`); whatever else names it, the
table reports only the batch mismatch check (mean, p99, k3; max against the catastrophic cap) on each batch's mean /
p99 / k3 / max |Δlogp|. A decision that does not depend on the batch size: healthy batches pass at both sizes, faulty
ones fail at both. (A stale prefix cache is left out: the tiny prompts are shorter than one KV block, so training
batches never hit a cached block — it is harmless there and the gate's cached/uncached probe names it.)
"""

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import DOCS, append, run_child, single_process_env  # noqa: E402

KEYS = ("mean_abs_logprob_diff", "p99_abs_logprob_diff", "kl_k3", "max_abs_logprob_diff")
# engine-side or update-path faults that move the probe and show in training batches
FAULTS = ("raw_logprobs", "sampler_mismatch", "skip_weight_sync", "partial_weight_sync", "engine_logprob_bias")


def child(a) -> None:
    single_process_env()
    import torch
    from models import model_dir

    from trl_correct import CorrectGRPOConfig, CorrectGRPOTrainer
    from trl_correct.testing.faults import inject
    from trl_correct.core.checks import mismatch_check
    from trl_correct.tasks.tiny import keyword_reward, tiny_prompts

    n, t = (int(x) for x in a.size.split("x"))
    args = CorrectGRPOConfig(
        output_dir=tempfile.mkdtemp(), bf16=a.bf16, use_cpu=not torch.cuda.is_available(), max_steps=a.steps, seed=0,
        per_device_train_batch_size=n, num_generations=4, max_completion_length=t, temperature=0.9,
        learning_rate=1e-2, beta=0.0, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        gate="observe", verify_weight_sync=a.fault == "none", vllm_kv_cache_gib=4.0)
    trainer = CorrectGRPOTrainer(model=str(model_dir(a.model)), reward_funcs=[keyword_reward], args=args,
                                 train_dataset=tiny_prompts())
    if a.fault != "none":
        inject(trainer, a.fault, at_step=1)
    trainer.train()
    th = trainer.gate.thresholds
    rows = [{"step": r["step"], **{k: r[k] for k in KEYS}, "n_tokens": r["n_tokens"],
             "fails": not mismatch_check(r, th).passed} for r in trainer.step_records]
    with open(a.out, "w") as f:
        json.dump({"thresholds": th, "gate": trainer.gate_report.passed, "rows": rows}, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2-rand-2m", help="bench/models.py; the default's completions run to the "
                    "token limit (the tiny model's stop at EOS after a few dozen tokens, far from 1e5 a step)")
    ap.add_argument("--sizes", default="8x128,512x200", help="completions x max tokens: 1,024 and 102,400 tokens")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--faults", default=",".join(FAULTS))
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    ap.add_argument("--fault", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    tmp = tempfile.mkdtemp(prefix="batch-scaling-")
    rows = ["| run | batch | scored tokens | thresholds mean / p99 / k3 / max | steps 0 .. n: mean / p99 / k3 / max "
            "(FAIL = the batch mismatch check fails) | decision |", "|---|---|---|---|---|---|"]
    verdicts = {}
    for fault in ["none", *[f for f in a.faults.split(",") if f]]:
        for size in a.sizes.split(","):
            path = os.path.join(tmp, f"{fault}-{size}.json")
            flags = ["--model", a.model, "--size", size, "--steps", str(a.steps), "--fault", fault,
                     *(["--bf16"] if a.bf16 else [])]
            r = run_child([__file__, "--child", "--out", path, *flags], path, f"{fault} {size}")
            th = r["thresholds"]
            steps = "; ".join(f"{' / '.join(f'{s[k]:.3g}' for k in KEYS)}{' FAIL' if s['fails'] else ''}"
                              for s in r["rows"])
            after = [s["fails"] for s in r["rows"] if fault == "none" or s["step"] >= 1]
            decided = ("all pass" if not any(after) else "all fail" if all(after) else
                       f"{sum(after)}/{len(after)} fail") if fault == "none" else (
                "caught" if any(after) else "MISSED")
            verdicts.setdefault(fault, []).append(decided)
            tokens = max(s["n_tokens"] for s in r["rows"])
            rows.append(f"| {'healthy' if fault == 'none' else fault + ' from step 1'} | {size} | {tokens:,} | "
                        f"{' / '.join(f'{th[k]:.3g}' for k in KEYS)} | {steps} | {decided} |")
            print(rows[-1], flush=True)
    same = all(len(set(v)) == 1 for v in verdicts.values())
    notes = (f"Model `{a.model}`, {'bf16' if a.bf16 else 'fp32'}, T = 0.9, lr 1e-2, `gate: observe`; faults from "
             "step 1 with the fingerprint off (only the batch statistics decide here). Same decision at every size for "
             f"every run: **{'yes' if same else 'NO'}**.")
    append("Per-step decision vs batch size", "\n".join(rows), notes, None if a.no_append else DOCS)


if __name__ == "__main__":
    main()
