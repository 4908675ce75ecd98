"""What each side runs with, as typed values: the inputs of the gate's static checks.

`TrainerFacts` is stated by the trainer (trainer.py `trainer_facts()`), `EngineFacts` is read back from vLLM's own
config objects by the engine adapter (engine.py `Engine.facts()`). Both are plain frozen dataclasses: the static checks
of gate.py are pure functions of them, and tests build them by hand. `generation_defaults` reads the sampler defaults
of a model's own generation_config.json (transformers). Knows neither vLLM nor TRL.
"""

from dataclasses import asdict, dataclass, field

from .sampler import SAMPLER_FIELDS, SamplerSpec


@dataclass(frozen=True)
class TrainerFacts:
    """The trainer's side: how it computes and under which sampler transform it scores tokens."""

    compute_dtype: str  # float32 | bfloat16 | float16
    head_dtype: str  # the dtype the lm_head computes in
    fp32_lm_head: bool = True  # the config asks for an fp32 head on both sides
    sampler: SamplerSpec = field(default_factory=SamplerSpec)  # what its logprobs are taken under
    sampler_unsupported: str | None = None  # why the trainer cannot reproduce the sampler (None: it can)
    sampler_defaults_applied: dict = field(default_factory=dict)  # model generation_config values put into effect
    dropout: tuple = ()  # where its forward draws dropout while training
    bit_exact: bool = False  # the config asks for bit-exact mode
    attention_dropped: str | None = None  # what the trainer's attention implementation leaves out (None: nothing)


@dataclass(frozen=True)
class TransformersBackend:
    """vLLM serves the model through its Transformers backend (it has no native implementation of the architecture)."""

    architecture: str  # the checkpoint's architecture, e.g. Olmo2ForCausalLM
    vllm_class: str  # the backend class vLLM runs it with, e.g. TransformersForCausalLM
    patched: tuple[str, ...] = ()  # transformers classes vLLM's compile decorator patched in place (the trainer's too)
    unsupported: str | None = None  # why the trainer cannot run those classes next to this engine (None: it can)


@dataclass(frozen=True)
class EngineFacts:
    """The engine's side, as vLLM really runs it."""

    compute_dtype: str
    head_dtype: str
    logprobs_mode: str
    sampler: SamplerSpec  # the settings its SamplingParams carry, in the order its sampler applies them
    head_dtype_supported: bool = True  # this vLLM can run the head in another dtype (hf_overrides head_dtype)
    prefix_caching: bool = False
    reset_after_sync: bool = True  # the prefix cache is reset after every weight load
    async_scheduling: bool = False
    generation_config: dict = field(default_factory=dict)  # the model's own sampler defaults (not applied)
    unreproduced: dict = field(default_factory=dict)  # generation_kwargs the trainer cannot reproduce
    block_size: int = 16
    vllm_version: str = ""
    batch_invariant: bool = False  # vLLM's batch-invariant kernels are on in this process
    batch_invariant_unsupported: str | None = None  # why they cannot be (None: they can)
    transformers_backend: TransformersBackend | None = None  # None: vLLM implements the architecture natively

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sampler"] = self.sampler.to_dict()
        return d


def generation_defaults(model: str, trust_remote_code: bool = False) -> dict:
    """The sampler defaults the model's own generation_config.json sets (the engine is built to ignore them, so the
    config's values rule on both sides; the gate reports the ones not in effect). Empty when there is none."""
    from transformers import GenerationConfig

    try:
        cfg = GenerationConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):  # no generation_config.json: nothing to report
        return {}
    return {k: getattr(cfg, k) for k in SAMPLER_FIELDS if k in cfg.to_diff_dict()}
