"""The gate on the tiny mixture-of-experts families (tiny.py `MOE_FAMILIES`): per family and dtype, a real
CorrectGRPOTrainer (colocated vLLM engine) runs the gate and 3 GRPO steps; printed: the gate verdict, its probe's
mean / p99 / max |Δlogprob| (trainer vs engine), the routing figures (the share of token-layers and of tokens whose
experts differ between the engine and the trainer's router, the trainer-vs-itself floor, the limit; with --replay
the mismatch with and without routing replay), every step's mean / max and routing flips, and the stale groups of
the last sync.

    .venv/bin/python bench/moe_gate.py                       # every MoE family, float32
    .venv/bin/python bench/moe_gate.py --dtype bfloat16 qwen3_moe
    .venv/bin/python bench/moe_gate.py --dtype bfloat16 --replay qwen3_moe    # routing_replay: true
    .venv/bin/python bench/moe_gate.py --dtype bfloat16 --gate enforce --steps 10 --seed 1 --completion 32 \
        --probe 8 32 qwen3-moe-0.4b                                           # the real-shaped bench model

Each family runs in a child process of its own (one vLLM engine at a time, and no class patched by one family's
engine leaks into the next). Mixtral streams checkpoint names (`revert_weight_conversion`): vLLM's Mixtral cannot load
transformers 5's renamed `mlp.experts.*` tensors that adapters/weights.py streams today (tests/test_moe.py).
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_child  # noqa: E402

STEPS = 3


def model_path(family: str) -> str:
    """A tiny MoE family (tiny.py MOE_FAMILIES), a bench model (bench/models.py, e.g. qwen3-moe-0.4b) or a folder."""
    from trl_correct.tasks.tiny import MOE_FAMILIES, tiny_family_dir

    if family in MOE_FAMILIES:
        return str(tiny_family_dir(family))
    if os.path.isdir(family):
        return family
    from models import model_dir

    return str(model_dir(family))


def child(family: str, dtype: str, out: str, replay: bool = False, steps: int = STEPS, probe=(4, 8), seed: int = 0,
          gate: str = "observe", completion: int = 12, batch: int = 8) -> None:
    # as the tests run: no launcher variables (the engine sets its own while it builds, adapters/engine.launcher_env)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    import torch
    from transformers.core_model_loading import revert_weight_conversion

    from trl_correct import CorrectGRPOConfig, CorrectGRPOTrainer
    from trl_correct.tasks.tiny import keyword_reward, tiny_prompts

    class CheckpointNames(CorrectGRPOTrainer):
        def engine_weights(self):
            model = self.accelerator.unwrap_model(self.model)
            return iter(revert_weight_conversion(model, {n: p.detach() for n, p in model.named_parameters()}).items())

    with tempfile.TemporaryDirectory() as tmp:
        args = CorrectGRPOConfig(output_dir=tmp, bf16=dtype == "bfloat16", max_steps=steps, learning_rate=1e-3,
                                 per_device_train_batch_size=batch, num_generations=4,
                                 max_completion_length=completion,
                                 temperature=0.9, beta=0.0, logging_steps=1, save_strategy="no", report_to="none",
                                 seed=seed, probe_size=probe[0], probe_tokens=probe[1], disable_tqdm=True, gate=gate,
                                 use_cpu=dtype == "bfloat16" and not torch.cuda.is_available(),
                                 routing_replay=replay)
        cls = CheckpointNames if family == "mixtral" else CorrectGRPOTrainer
        trainer = cls(model=model_path(family), reward_funcs=[keyword_reward], args=args,
                      train_dataset=tiny_prompts())
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
        report = trainer.gate_report
        steps = [(r["mean_abs_logprob_diff"], r["max_abs_logprob_diff"],
                  (r.get("routing") or {}).get("flip_frac_token_layer")) for r in trainer.step_records]
        step_routing = [r.get("routing") for r in trainer.step_records]
        failures = [f.to_dict() for f in trainer.failures]
        result = dict(family=family, dtype=dtype, replay=replay, seed=seed, gate_mode=gate, seconds=seconds,
                      failures=failures, gate="PASS" if report.passed else "FAIL",
                      failed=[c.name for c in report.checks if not c.passed],
                      probe_mean=report.mismatch["mean_abs_logprob_diff"],
                      probe_p99=report.mismatch["p99_abs_logprob_diff"],
                      probe_max=report.mismatch["max_abs_logprob_diff"], routing=report.mismatch.get("routing"),
                      thresholds=report.mismatch.get("thresholds"), steps=steps, step_routing=step_routing,
                      syncs=trainer.engine.sync_count, last_sync_stale=trainer.engine.last_sync_stale,
                      table=report.table())
        trainer.engine.close()
    Path(out).write_text(json.dumps(result))


def main() -> None:
    from trl_correct.tasks.tiny import MOE_FAMILIES

    ap = argparse.ArgumentParser()
    ap.add_argument("families", nargs="*", default=list(MOE_FAMILIES))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--replay", action="store_true", help="routing_replay: true")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--probe", type=int, nargs=2, default=(4, 8), metavar=("PROMPTS", "TOKENS"),
                    help="probe_size and probe_tokens (the config's defaults: 8 32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gate", default="observe", choices=["enforce", "warn", "observe"])
    ap.add_argument("--completion", type=int, default=12, help="max_completion_length")
    ap.add_argument("--batch", type=int, default=8, help="per_device_train_batch_size (4 completions per prompt)")
    ap.add_argument("--json", help="append each run's result as one JSON line here")
    ap.add_argument("--tables", action="store_true", help="print each family's gate table too")
    ap.add_argument("--child", nargs=2, metavar=("FAMILY", "OUT"))
    a = ap.parse_args()
    if a.child:
        return child(a.child[0], a.dtype, a.child[1], a.replay, a.steps, tuple(a.probe), a.seed, a.gate,
                     a.completion, a.batch)
    for family in a.families:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "r.json")
            r = run_child([__file__, "--dtype", a.dtype, *(["--replay"] if a.replay else []), "--steps",
                           str(a.steps), "--probe", *map(str, a.probe), "--seed", str(a.seed), "--gate", a.gate,
                           "--completion", str(a.completion), "--batch", str(a.batch), "--child", family, out], out,
                          family)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps({k: v for k, v in r.items() if k != "table"}) + "\n")
        steps = " ".join(f"{m:.3g}/{x:.3g}" + (f"/{f:.1%}" if f is not None else "") for m, x, f in r["steps"])
        th = r["thresholds"] or {}
        print(f"moe-gate {r['family']} {r['dtype']} seed={r['seed']} gate:{r['gate_mode']} {r['seconds']:.0f}s "
              f"failed batches={len(r['failures'])} replay={'on' if r['replay'] else 'off'} gate={r['gate']} "
              f"failed={r['failed']} probe mean={r['probe_mean']:.3g} (limit {th.get('mean_abs_logprob_diff', 0):.3g}) "
              f"p99={r['probe_p99']:.3g} (limit {th.get('p99_abs_logprob_diff', 0):.3g}) max={r['probe_max']:.3g} "
              f"steps(mean/max/flips)={steps} syncs={r['syncs']} last_sync_stale={r['last_sync_stale']}", flush=True)
        g = r["routing"]
        if g:
            floor = g.get("floor") or {}
            line = (f"moe-gate {r['family']} {r['dtype']} routing: flips {g['flip_frac_token_layer']:.2%} of "
                    f"{g['n_token_layers']} token-layers, {g['flip_frac_token']:.2%} of {g['n_tokens']} tokens; floor "
                    f"{floor.get('flip_frac_token_layer', float('nan')):.2%} / {floor.get('flip_frac_token', float('nan')):.2%}"
                    f" ({floor.get('source')}); limit {g.get('threshold', float('nan')):.3g}")
            if "replay" in g:
                w, wo = g.get("mismatch_with_replay") or {}, g.get("mismatch_without_replay") or {}
                line += (f"; replay: experts not the engine's on {g['replay']['flip_frac_token_layer']:.2%}; "
                         f"mismatch without replay mean {wo.get('mean_abs_logprob_diff', float('nan')):.3g} "
                         f"p99 {wo.get('p99_abs_logprob_diff', float('nan')):.3g} "
                         f"max {wo.get('max_abs_logprob_diff', float('nan')):.3g}, with replay mean "
                         f"{w.get('mean_abs_logprob_diff', float('nan')):.3g} "
                         f"p99 {w.get('p99_abs_logprob_diff', float('nan')):.3g} "
                         f"max {w.get('max_abs_logprob_diff', float('nan')):.3g}")
            print(line, flush=True)
        if any(r["step_routing"]):
            print(f"moe-gate {r['family']} {r['dtype']} steps routing: " + "; ".join(
                f"{x['flip_frac_token_layer']:.2%} of {x['n_token_layers']} token-layers"
                + (f" (replayed off the engine's: {x['replay']['flip_frac_token_layer']:.2%})" if "replay" in x else "")
                for x in r["step_routing"] if x), flush=True)
        if a.tables:
            print(r["table"], flush=True)


if __name__ == "__main__":
    main()
