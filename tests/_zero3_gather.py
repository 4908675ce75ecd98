"""Run by tests/test_sharded.py under torchrun (2 CPU ranks, gloo, DeepSpeed's CPU accelerator): partition the tiny
model with ZeRO-3 and check that policy_weights() hands every rank the whole, exact tensors the engine needs.
`Gather` is the one call TRL's DistributedBackend makes under ZeRO-3 (deepspeed.zero.GatheredParameters)."""

import os
import sys

import deepspeed
import torch
from transformers import AutoModelForCausalLM

from trl_correct.adapters.weights import policy_weights


class Gather:
    is_zero3 = True

    def gather_params(self, params):
        return deepspeed.zero.GatheredParameters(params)


deepspeed.init_distributed(dist_backend="gloo")
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
whole = {n: p.detach().clone() for n, p in model.named_parameters()}
cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True,
       "optimizer": {"type": "SGD", "params": {"lr": 1e-3}}}
deepspeed.initialize(model=model, config=cfg, model_parameters=model.parameters())
local = sum(p.numel() for p in model.parameters())
got = dict(policy_weights(model, Gather()))
bad = [n for n in whole if n not in got or not torch.equal(got[n], whole[n])]
print(f"rank {os.environ['RANK']}: {len(got)} tensors, {local} elements held locally, differing: {bad}", flush=True)
code = 1 if bad or set(got) != set(whole) or local else 0
# Leave without the interpreter's teardown: DeepSpeed's shared-memory comm threads can abort a rank at exit
# ("terminate called without an active exception", seen once in CI after both ranks had printed their result).
torch.distributed.barrier()
torch.distributed.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
