"""Run by tests/test_sharded.py under torchrun (2 CPU ranks, gloo): shard the tiny model with FSDP2 and check that
policy_weights() hands every rank the whole, exact tensors the engine needs. Exits non-zero on any difference."""

import os
import sys

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

from trl_correct.adapters.weights import policy_weights

torch.distributed.init_process_group("gloo")
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
whole = {n: p.detach().clone() for n, p in model.named_parameters()}
mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
for layer in model.model.layers:
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
shard = next(p for n, p in model.named_parameters() if n.endswith("mlp.down_proj.weight"))
assert type(shard).__name__ == "DTensor" and shard.to_local().numel() < shard.numel(), "not sharded"
got = dict(policy_weights(model))
bad = [n for n in whole if n not in got or not torch.equal(got[n], whole[n])]
print(f"rank {os.environ['RANK']}: {len(got)} tensors, local shard {shard.to_local().numel()} of {shard.numel()}, "
      f"differing: {bad}", flush=True)
torch.distributed.destroy_process_group()
sys.exit(1 if bad or set(got) != set(whole) else 0)
