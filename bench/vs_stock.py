"""trl-correct vs stock TRL 1.16 on the same GRPO work: trainer/engine parity of every training batch, and step time.

    python bench/vs_stock.py [--rows fp32,fp32-same-engine,bf16] [--steps 12] [--repeats 5] [--model NAME|DIR]
                             [--no-append] [--resume DIR]

stock = TRL's `GRPOTrainer(use_vllm=True, vllm_mode="colocate")` with TRL's defaults: engine dtype `auto`, lm_head in
the trainer's dtype, IS correction `sequence_mask` capped at 3. ours = `CorrectGRPOTrainer` with its defaults: engine in
the trainer's dtype, fp32 lm_head on both sides, the gate before step 0 (enforce) and every per-step check, TIS
`token_truncate` capped at 2. Same model (the embedded tiny one unless --model), prompts, sampler (T = 0.9), seeds and
batch shape (recipes/tiny.yaml). Rows: fp32 = trainer in fp32 (stock's engine: vLLM's `auto`, bf16 on CPU);
fp32-same-engine = the same with stock's engine forced to fp32, so the step times differ only by trl-correct's own
work; bf16 = trainer autocast bf16 (both engines bf16).

On a CPU, stock TRL's colocated sync crashes at the first step on vLLM CPU (`'Parameter' object has no attribute
'weight_loader'`: the CPU backend prepacks its linear weights). The stock runs here replace ONLY that call with vLLM's
`reload_weights` + `reset_prefix_cache()` (what our engine adapter does, without the verification); everything else
is stock. On a GPU the stock runs are unmodified.

Each run is its own process; runs alternate stock / ours, `--repeats` times per row. Parity pools every training
batch's tokens over all repeats: trainer = TRL's `old_per_token_logps`, engine = `sampling_per_token_logps`, over the
loss mask, summarised by trl_correct.core.numerics. IS clip/mask = share of tokens whose applied IS weight differs from the
raw ratio. Step time = TRL's own `step_time` (generation, sync, scoring, checks, backward) per optimizer step, first 2
steps dropped, median per run; the table gives min / median / max of the per-run medians. For ours, "checks" is the
time spent in trl-correct's own per-step work (batch checks + metrics, weight fingerprints), measured in the same runs.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (DOCS, append, instrument, own_work_per_step, run_child, single_process_env,  # noqa: E402
                     step_times)

# row -> (trainer bf16?, engine dtype forced on stock). fp32 and bf16 are what each side does by default;
# fp32-same-engine forces stock's engine to fp32 too, so the two runs differ only by trl-correct's own work.
ROWS = {"fp32": (False, None), "fp32-same-engine": (False, "float32"), "bf16": (True, None)}
SHAPE = dict(per_device_train_batch_size=16, num_generations=4, max_completion_length=24, temperature=0.9,
             learning_rate=1e-3, beta=0.0, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True)


def model_path(model: str | None) -> str:
    """A bench/models.py name (default: tiny) or a model directory."""
    from models import NAMES, model_dir

    if model and model not in NAMES:
        return model  # a directory
    return str(model_dir(model or "tiny"))


def cpu_sync_shim(gen) -> None:
    """Stock TRL's sync with its one CPU-fatal call (model.load_weights per tensor) replaced by reload_weights."""

    def sync_weights():
        gen.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": gen._iter_named_params(),
                                                         "is_checkpoint_format": True})
        gen.llm.reset_prefix_cache()

    gen.sync_weights = sync_weights


def child(a) -> None:
    single_process_env()
    import torch
    from trl import GRPOConfig, GRPOTrainer

    from trl_correct import CorrectGRPOConfig, CorrectGRPOTrainer
    from trl_correct.tasks.tiny import keyword_reward, tiny_prompts

    ours = a.child == "ours"
    base = CorrectGRPOTrainer if ours else GRPOTrainer
    batches, cost = [], {}
    snaps = instrument(cost) if ours else None

    class Recorder(base):
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            if self.model.training:
                mask = (out["completion_mask"] * out.get("tool_mask", 1)).bool()
                r = (out["old_per_token_logps"] - out["sampling_per_token_logps"]).double()
                w = out["importance_sampling_ratio"].double()
                raw = torch.exp(torch.where(mask, r, 0.0).sum(-1, keepdim=True) if w.size(-1) == 1 else r)
                changed = ((w - raw).abs() > 1e-6 * raw.abs()).expand_as(mask) & mask
                batches.append(dict(r=r[mask].tolist(), changed=int(changed.sum())))
            return out

    bf16, stock_engine_dtype = ROWS[a.row]
    if not ours and stock_engine_dtype:  # stock with only the engine dtype forced
        import functools

        import trl.generation.vllm_generation as vg

        vg.LLM = functools.partial(vg.LLM, dtype=stock_engine_dtype)
    common = dict(output_dir=tempfile.mkdtemp(), max_steps=a.steps, seed=a.seed, bf16=bf16, **SHAPE,
                  use_cpu=not torch.cuda.is_available())  # bf16 on a CPU: transformers wants use_cpu said
    if ours:
        args = CorrectGRPOConfig(**common)
    else:
        args = GRPOConfig(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.3, **common)
    trainer = Recorder(model=model_path(a.model), reward_funcs=[keyword_reward], args=args,
                       train_dataset=tiny_prompts())
    if not ours and not torch.cuda.is_available():
        cpu_sync_shim(trainer.vllm_generation)
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    if ours:
        engine_dtype = trainer.engine.facts().compute_dtype
    else:
        dtype = trainer.vllm_generation.llm.llm_engine.vllm_config.model_config.dtype
        engine_dtype = str(dtype).removeprefix("torch.")
    own = own_work_per_step(cost, snaps) if ours else None  # the gate before step 0: bench/check_cost.py's business
    with open(a.out, "w") as f:
        json.dump(dict(cost=own, batches=batches, step_times=step_times(trainer), engine_dtype=engine_dtype,
                       checks_s=own["total"] if ours else None, train_s=train_s), f)


def summarize(runs: list[dict]) -> dict:
    import torch

    from trl_correct.core.numerics import RATIO_BAND, summarize_gaps

    r = torch.tensor([x for run in runs for b in run["batches"] for x in b["r"]], dtype=torch.float64)
    s = summarize_gaps(r)
    lo, hi = (torch.log(torch.tensor(x, dtype=torch.float64)) for x in RATIO_BAND)
    s["outside"] = float(((r < lo) | (r > hi)).double().mean())
    s["changed"] = sum(b["changed"] for run in runs for b in run["batches"]) / r.numel()
    s["step"] = [statistics.median(run["step_times"]) for run in runs]
    s["checks"] = [run["checks_s"] for run in runs if run["checks_s"] is not None]
    s["engine"] = runs[0]["engine_dtype"]
    return s


def table(results) -> str:
    lines = ["| row | run | engine dtype | tokens | mean \\|Δ\\| | p99 \\|Δ\\| | max \\|Δ\\| | k3 KL "
             "| ratio ∉ [0.8, 1.25] | IS clip/mask | step s: min / median / max | step vs stock "
             "| our checks per step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row, res in results:
        stock_med = statistics.median(res["stock"]["step"])
        for variant in ("stock", "ours"):
            s = res[variant]
            med = statistics.median(s["step"])
            chk = (f"{1e3 * statistics.median(s['checks']):.1f} ms ({100 * statistics.median(s['checks']) / med:.1f} %)"
                   if s["checks"] else "-")
            lines.append(f"| {row} | {variant} | {s['engine']} | {s['n_tokens']} | {s['mean_abs_logprob_diff']:.3g} | "
                         f"{s['p99_abs_logprob_diff']:.3g} | {s['max_abs_logprob_diff']:.3g} | {s['kl_k3']:.3g} | "
                         f"{s['outside']:.3g} | {s['changed']:.3g} | {min(s['step']):.3f} / {med:.3f} / "
                         f"{max(s['step']):.3f} | {med / stock_med:.3f}x | {chk} |")
        s, o = res["stock"], res["ours"]

        def ratio(k):
            return f"{o[k] / s[k]:.3g}x" if s[k] > 0 else "-"

        lines.append(f"| {row} | **ours / stock** | | | {ratio('mean_abs_logprob_diff')} | "
                     f"{ratio('p99_abs_logprob_diff')} | {ratio('max_abs_logprob_diff')} | {ratio('kl_k3')} | "
                     f"{ratio('outside')} | {ratio('changed')} | | | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    ap.add_argument("--steps", type=int, default=12, help="GRPO steps per run (the first 2 are not timed)")
    ap.add_argument("--repeats", type=int, default=5, help="runs per variant and row, interleaved")
    ap.add_argument("--model", default=None, help="a bench/models.py name (tiny, tiny-v152k, qwen2-137m) or a model "
                                                   "directory (default: the embedded tiny model)")
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to docs/BENCHMARKS.md")
    ap.add_argument("--resume", help="the per-run folder of an interrupted bench (printed at its start): keep its runs")
    ap.add_argument("--child", choices=["stock", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--row", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    out_dir = a.resume or tempfile.mkdtemp(prefix="vs-stock-")
    print("per-run JSON in", out_dir, flush=True)
    results = []
    for row in a.rows.split(","):
        runs = {"stock": [], "ours": []}
        for rep in range(a.repeats):
            for variant in ("stock", "ours") if rep % 2 == 0 else ("ours", "stock"):  # interleaved, alternating lead
                path = os.path.join(out_dir, f"{row}-{variant}-{rep}.json")
                if os.path.exists(path):  # --resume: this run finished before
                    runs[variant].append(json.load(open(path)))
                    continue
                cmd = [__file__, "--child", variant, "--row", row, "--seed", str(rep), "--steps", str(a.steps),
                       "--out", path] + (["--model", a.model] if a.model else [])
                runs[variant].append(run_child(cmd, path, f"{row}/{variant} run {rep}"))
                run = runs[variant][-1]
                print(f"{row} {variant} #{rep}: median step {statistics.median(run['step_times']):.4f} s, "
                      f"train() {run['train_s']:.1f} s", flush=True)
        results.append((row, {v: summarize(rs) for v, rs in runs.items()}))
    model = a.model or "embedded tiny Qwen2 (2 layers, hidden 128, vocab 1024)"
    notes = (f"Model: {model}; recipes/tiny.yaml shape (16 completions x 24 tokens, T = 0.9), {a.steps} steps per run, "
             f"{a.repeats} interleaved runs per variant and row.")
    append("trl-correct vs stock TRL: parity and step time", table(results), notes,
           None if a.no_append else DOCS)


if __name__ == "__main__":
    main()
