"""What the engine's in-process MoE routing capture costs (adapters/engine.py `_routing_capture_bound`, `_RoutingTap`):
the same generation timed on an engine built with the capture bound and on one built without it
(`EngineSettings.capture_routing`), each in a child process of its own, alternating, one engine at a time. Printed per
setting: the median wall time of a generation round (prompts x completions), the capture's own bookkeeping after each
step (`Engine.routing_seconds`: reading the buffers, splitting rows by request) and the cost as a share.

    .venv/bin/python bench/routing_cost.py                         # tiny Qwen3-MoE (tiny.py), float32
    .venv/bin/python bench/routing_cost.py --model DIR --dtype bfloat16 --prompts 16 --tokens 64 --rounds 5

The in-graph part (each MoE layer's copy of its top-k ids into its buffer) runs inside the compiled forward and is only
seen in the difference of the two medians.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_child  # noqa: E402


def child(model: str, dtype: str, capture: bool, prompts: int, tokens: int, rounds: int, out: str) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    from trl_correct.adapters.engine import Engine, EngineSettings

    engine = Engine(EngineSettings(model=model, dtype=dtype, max_model_len=512, max_num_seqs=max(prompts, 8),
                                   capture_routing=capture))
    batch = [[(7 * i + j) % 500 + 3 for j in range(24 + i % 8)] for i in range(prompts)]
    engine.sample(batch, max_tokens=tokens, seed=0, ignore_eos=True)  # warm-up
    times, book = [], []
    for r in range(rounds):
        before = engine.routing_seconds
        t0 = time.perf_counter()
        engine.sample(batch, max_tokens=tokens, seed=r, ignore_eos=True)
        times.append(time.perf_counter() - t0)
        book.append(engine.routing_seconds - before)
    Path(out).write_text(json.dumps(dict(capture=capture, layers=list(engine.routing_layers), times=times,
                                         bookkeeping=book)))
    engine.close()


def main() -> None:
    from trl_correct.tasks.tiny import tiny_family_dir

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="an MoE model folder (default: the tiny Qwen3-MoE)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2, help="child runs per setting, alternating")
    ap.add_argument("--child", nargs=2, metavar=("CAPTURE", "OUT"))
    a = ap.parse_args()
    model = a.model or str(tiny_family_dir("qwen3_moe"))
    if a.child:
        return child(model, a.dtype, a.child[0] == "1", a.prompts, a.tokens, a.rounds, a.child[1])
    got = {True: [], False: []}
    book = []
    for _ in range(a.repeats):
        for capture in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "r.json")
                r = run_child([__file__, "--model", model, "--dtype", a.dtype, "--prompts", str(a.prompts),
                               "--tokens", str(a.tokens), "--rounds", str(a.rounds), "--child",
                               "1" if capture else "0", out], out, f"capture={capture}")
            got[capture] += r["times"]
            if capture:
                book += r["bookkeeping"]
    off, on = statistics.median(got[False]), statistics.median(got[True])
    kept = statistics.median(book)
    print(f"routing-cost model={Path(model).name} {a.dtype} {a.prompts} prompts x {a.tokens} tokens: "
          f"generation median {off:.3f} s without capture, {on:.3f} s with ({(on - off) / off:+.1%}); "
          f"capture bookkeeping {kept * 1e3:.1f} ms per round ({kept / on:.1%}); "
          f"rounds {len(got[False])} + {len(got[True])}", flush=True)


if __name__ == "__main__":
    main()
