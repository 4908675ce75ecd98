"""Run by tests/test_sharded.py under torchrun (2 CPU ranks): one tensor-parallel engine group of 2 (vLLM's
external_launcher, one worker per rank) for the tiny model. The gate passes before step 0 and 2 GRPO steps follow
at the fp32 floor, every sync verified shard by shard; then one rank is made to keep its old shard of one weight
(fault `stale_shard`) and the next sync's check names that rank on both ranks; the gate re-run fails on it. Prints
one line per rank."""

import os
import sys
import tempfile

from trl_correct import CorrectGRPOConfig, CorrectGRPOTrainer
from trl_correct.testing.faults import inject
from trl_correct.tasks.tiny import keyword_reward, tiny_prompts

rank = int(os.environ["RANK"])
args = CorrectGRPOConfig(output_dir=tempfile.mkdtemp(), bf16=False, max_steps=2, learning_rate=1e-3, seed=0,
                         per_device_train_batch_size=8, num_generations=4, max_completion_length=12, temperature=0.9,
                         beta=0.0, logging_steps=1, save_strategy="no", report_to="none", probe_size=4,
                         probe_tokens=8, disable_tqdm=True, vllm_tensor_parallel_size=2)
trainer = CorrectGRPOTrainer(model=sys.argv[1], reward_funcs=[keyword_reward], args=args, train_dataset=tiny_prompts())
trainer.train()
report, steps = trainer.gate_report, trainer.step_records
probe_max = report.mismatch["max_abs_logprob_diff"]
step_max = max(s["max_abs_logprob_diff"] for s in steps)
print(f"rank {rank}: gate {'PASS' if report.passed else 'FAIL ' + str(report.causes)}, probe max {probe_max:.3g}, "
      f"steps {len(steps)}, step max {step_max:.3g}, tis {[s['tis_enabled'] for s in steps]}, syncs "
      f"{trainer.engine.sync_count}, last sync {'ok' if trainer.gate.last_sync_check.passed else 'STALE'}", flush=True)
ok = report.passed and probe_max < 1e-4 and step_max < 1e-4 and len(steps) == 2 and trainer.gate.last_sync_check.passed
inject(trainer, "stale_shard")  # the last rank of the group skips one weight from now on; the last update is unsynced
check = trainer.sync_engine()
print(f"rank {rank}: after stale_shard: {check.name} {'ok' if check.passed else 'FAILED'}: {check.detail}", flush=True)
report = trainer.run_gate()
print(f"rank {rank}: gate after stale_shard: {'PASS' if report.passed else 'FAIL'} causes {report.causes}", flush=True)
ok = ok and not check.passed and "rank 1 (TP group [0, 1])" in check.detail and "weight_sync" in report.causes
sys.exit(0 if ok else 1)
