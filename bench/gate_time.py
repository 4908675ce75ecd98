"""Gate time before step 0 with and without the fp32 probe, in one run: a CorrectGRPOTrainer in bf16 (on the CPU:
use_cpu) on a bench model, its clean gate timed by its own phase reports; the fp32 probe is one phase, so the gate
without it is the rest. Prints the totals, the ratio, each phase, the fp32 probe's figures and the gate table.

    .venv/bin/python bench/gate_time.py qwen2.5-0.5b
"""
import os, sys, time, tempfile, logging
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0"); os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
sys.path.insert(0, "bench")
from models import model_dir
from trl_correct import CorrectGRPOConfig, CorrectGRPOTrainer
from trl_correct.tasks.tiny import keyword_reward, tiny_prompts
args = CorrectGRPOConfig(output_dir=tempfile.mkdtemp(), bf16=True, use_cpu=True, max_steps=1, per_device_train_batch_size=8, num_generations=4, max_completion_length=32, temperature=0.9, beta=0.0, save_strategy="no", report_to="none", disable_tqdm=True, vllm_kv_cache_gib=1, model_init_kwargs={"dtype": "float32"})
t = CorrectGRPOTrainer(model=str(model_dir(sys.argv[1])), reward_funcs=[keyword_reward], args=args, train_dataset=tiny_prompts())
phases = {}
orig = t.gate.on_phase
def on_phase(name, s):
    phases[name] = phases.get(name, 0) + s; orig(name, s)
t.gate.on_phase = on_phase
t0 = time.perf_counter(); run = t.full_gate(); total = time.perf_counter() - t0
fp = phases.get("fp32 probe", 0)
print("GATE", sys.argv[1], run.report.passed, "total %.1f s, fp32 probe %.1f s, without %.1f s, ratio %.2f" % (total, fp, total - fp, total / (total - fp)), phases)
print("FP32PROBE", run.report.mismatch.get("fp32_probe"))
print(run.report.table())
