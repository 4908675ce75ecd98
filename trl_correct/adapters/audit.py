"""Trainer-side measurements the gate needs beyond the probe's |Δlogp|:

- loss audit: the importance weights really reach the loss and its gradient (TRL #5031 / Liger #1082: a loss path
  that computes the ratio and drops it trains uncorrected, grad norm x100, without a word);
- self-consistency: the trainer's logprobs of a batch scored whole vs one sequence at a time (the floor under any
  engine comparison: padding and batch shape must not move them beyond the dtype's noise);
- token identity: every completion the trainer scores holds exactly the token ids the engine sampled (no decode ->
  re-encode anywhere on the path, multi-turn included).

Each returns measurements; gate.py decides. Knows TRL's loss inputs; nothing of vLLM.
"""

from contextlib import contextmanager

import torch

from ..core.facts import generation_defaults
from ..core.numerics import summarize_gaps, valid_gaps
from .trl_api import ENTROPY_STATE, generate, metrics, pad, pad_token_id

AUDIT_SCALES = (0.0, 1.0, 2.0)  # the importance weights times these: the policy term must move by equal steps
AUDIT_SEED = 4321


def padded_batch(prompt_ids, completion_ids, pad_id: int, device) -> dict:
    """TRL's batch layout of token-id lists: prompt_ids/prompt_mask [B, P] left-padded, completion_ids/
    completion_mask [B, T] right-padded, on `device`."""
    def padded(rows, value, side):
        return pad([torch.tensor(x, dtype=torch.long) for x in rows], padding_value=value, padding_side=side).to(device)

    return dict(prompt_ids=padded(prompt_ids, pad_id, "left"),
                prompt_mask=padded([[1] * len(x) for x in prompt_ids], 0, "left"),
                completion_ids=padded(completion_ids, pad_id, "right"),
                completion_mask=padded([[1] * len(x) for x in completion_ids], 0, "right"))


def loss_inputs(trainer, prompt_ids, completion_ids, trainer_logprobs: torch.Tensor) -> dict:
    """The dict TRL's `compute_loss` takes, for the given prompts/completions: on-policy (old = trainer logprobs),
    every advantage 1 (so the policy term cannot cancel), importance weights to be set by the caller."""
    device = trainer.accelerator.device
    inputs = padded_batch(prompt_ids, completion_ids, pad_token_id(trainer), device)
    old = trainer_logprobs.detach().float().nan_to_num(0.0)
    inputs.update(advantages=torch.ones(len(prompt_ids), device=device), old_per_token_logps=old,
                  sampling_per_token_logps=old, num_items_in_batch=inputs["completion_mask"].sum().float())
    if trainer.beta != 0.0:
        inputs["ref_per_token_logps"] = old
    return inputs


@contextmanager
def quiet_trackers(trainer):
    """TRL's profiling logs timings straight to the trackers, trackio even before its run exists (it raises then;
    TRL 1.16 guards wandb and mlflow only). The gate runs before the trackers start: report_to is off meanwhile."""
    report_to, trainer.args.report_to = trainer.args.report_to, []
    try:
        yield
    finally:
        trainer.args.report_to = report_to


@contextmanager
def side_effects_undone(trainer):
    """TRL's loss and generation append to the trainer's metrics (and adaptive-entropy state): the gate's audits
    leave no trace (metrics cut back, state restored)."""
    lengths = {mode: {k: len(v) for k, v in d.items()} for mode, d in metrics(trainer).items()}
    saved = {k: getattr(trainer, k) for k in ENTROPY_STATE if hasattr(trainer, k)}
    had_steps = hasattr(trainer, "current_gradient_accumulation_steps")
    if not had_steps:
        trainer.current_gradient_accumulation_steps = 1
    try:
        yield
    finally:
        for mode, d in metrics(trainer).items():
            for k in list(d):
                if k not in lengths.get(mode, {}):
                    del d[k]
                else:
                    del d[k][lengths[mode][k]:]
        for k, v in saved.items():
            setattr(trainer, k, v)
        if not had_steps:
            del trainer.current_gradient_accumulation_steps


def loss_audit(trainer, prompt_ids, completion_ids, trainer_logprobs) -> tuple[list[float], list[float]]:
    """The trainer's own `compute_loss` on these completions with the importance weights (a fixed pattern in
    [0.5, 1.5], per token or per sequence as `tis_mode`) times each of AUDIT_SCALES. Returns (losses, gradient
    projections on a fixed random direction). Runs the unwrapped model (no DDP reducer); collectives inside the loss
    run on every rank, as the gate does."""
    inputs = loss_inputs(trainer, prompt_ids, completion_ids, trainer_logprobs)
    mask = inputs["completion_mask"]
    gen = torch.Generator().manual_seed(AUDIT_SEED)
    shape = (mask.size(0), 1) if trainer.args.tis_mode.startswith("sequence") else tuple(mask.shape)
    base = (0.5 + torch.rand(shape, generator=gen)).to(mask.device)
    model = trainer.accelerator.unwrap_model(trainer.model)
    params = [p for p in model.parameters() if p.requires_grad]
    losses, grads = [], []
    cuda = [trainer.accelerator.device] if trainer.accelerator.device.type == "cuda" else []
    with side_effects_undone(trainer), torch.enable_grad():
        for s in AUDIT_SCALES:
            with torch.random.fork_rng(devices=cuda):  # same dropout masks (LoRA dropout) at every scale
                torch.manual_seed(AUDIT_SEED)
                loss = trainer.compute_loss(model, dict(inputs, importance_sampling_ratio=base * s))
                g = torch.autograd.grad(loss, params, allow_unused=True)
            losses.append(float(loss.detach()))
            grads.append(_project(g, params))
    return losses, grads


def _project(grads, params) -> float:
    """<grad, d> for a fixed random direction d (seeded per parameter, regenerated on each call: no copy of the
    model is kept). Not <grad, params>: a LoRA B starts at 0, which would make that projection 0 at step 0."""
    total = 0.0
    for i, (g, p) in enumerate(zip(grads, params)):
        if g is None:
            continue
        gen = torch.Generator(device=p.device).manual_seed(AUDIT_SEED + i)
        d = torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)
        total += float((g.double() * d.double()).sum())
    return total


def self_consistency(policy, prompt_ids, completion_ids, batch_logprobs: torch.Tensor, mask: torch.Tensor) -> dict:
    """Mismatch statistics of the trainer's logprobs scored as one batch (`batch_logprobs` [B, T]) against the same
    sequences scored one at a time (no padding, batch 1)."""
    singles = [policy.score([p], [c])[0][0] for p, c in zip(prompt_ids, completion_ids)]
    single = pad([x.float() for x in singles], padding_value=float("nan"), padding_side="right")
    single = single.to(batch_logprobs.device)
    width = min(single.size(1), batch_logprobs.size(1))
    r, nonfinite = valid_gaps(batch_logprobs[:, :width], single[:, :width], mask[:, :width])
    return dict(summarize_gaps(r, nonfinite), batch_size=min(policy.args.per_device_train_batch_size,
                                                             len(prompt_ids)))


def generated_rows(trainer, prompts: list) -> tuple[list, dict]:
    """Generate for `prompts` (as the dataset holds them) through TRL's own `_generate` (the path every batch takes,
    subclass overrides and tool loops included), as the gate's dry batch. Returns (rows for `token_identity`, what
    the engine sampled meanwhile)."""
    trainer.engine.take_sampled()
    with side_effects_undone(trainer):
        prompt_ids, completion_ids, tool_mask, *_ = generate(trainer, prompts)
    rows = [(list(p), list(c), [bool(x) for x in tool_mask[i]] if tool_mask else [True] * len(c))
            for i, (p, c) in enumerate(zip(prompt_ids, completion_ids))]
    return rows, trainer.engine.take_sampled()


def dropout_sources(model) -> list[str]:
    """Where the trainer's forward draws dropout while training: Dropout modules with p > 0 (e.g. LoRA's
    lora_dropout) and the model config's dropout rates. Each makes the trainer's logprobs a random draw."""
    import torch.nn as nn

    modules: dict[float, int] = {}
    for m in model.modules():
        if isinstance(m, nn.Dropout) and m.p > 0:
            modules[m.p] = modules.get(m.p, 0) + 1
    found = [f"{n} Dropout module(s) with p={p:g}" for p, n in sorted(modules.items())]
    cfg = model.config.get_text_config() if hasattr(model, "config") else None
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "attn_pdrop", "embd_pdrop", "dropout"):
        v = getattr(cfg, key, None)
        if isinstance(v, (int, float)) and v > 0:
            found.append(f"config {key}={v:g}")
    return found


# transformers attention implementations that apply a config's attention soft-capping (sdpa ignores it: measured on
# Gemma 2, eager vs sdpa mean |Δlogp| 2.6e-4, max 4.3e-3, the same as soft-capping off)
SOFTCAP_ATTENTION = ("eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def attention_dropped(model) -> str | None:
    """What the trainer's attention implementation leaves out of the model's config (vLLM applies it); None when
    nothing."""
    cfg = model.config.get_text_config() if hasattr(model, "config") else None
    cap = getattr(cfg, "attn_logit_softcapping", None)
    impl = getattr(cfg, "_attn_implementation", None)
    if cap and impl not in SOFTCAP_ATTENTION:
        return f"attention soft-capping {cap:g} (attn_logit_softcapping) is ignored by attn_implementation={impl}"
    return None


def model_defaults(model, args) -> dict:
    """What the model itself asks of `args`, applied before the trainer is built: its generation_config's sampler
    defaults (under sampler_defaults=model; returned) and eager attention when it soft-caps its attention and no
    attn_implementation is set. What the user set is never changed."""
    import logging

    logger = logging.getLogger("trl_correct")
    path = model if isinstance(model, str) else getattr(model, "name_or_path", "")
    applied = args.apply_model_sampler_defaults(generation_defaults(path, args.trust_remote_code) if path else {})
    if applied:
        logger.info("trl-correct: sampler settings from the model's generation_config: %s", applied)
    if isinstance(model, str):
        init = dict(args.model_init_kwargs or {})
        args.model_init_kwargs = attention_default(model, init, args.trust_remote_code)
        if args.model_init_kwargs != init:
            logger.info("trl-correct: attn_implementation eager (not set: the model soft-caps its attention, which "
                        "transformers' default sdpa ignores)")
    return applied


def attention_default(model_path: str, init_kwargs: dict, trust_remote_code: bool = False) -> dict:
    """`init_kwargs` with eager attention when the model soft-caps its attention and no attn_implementation is set
    (transformers' default sdpa would ignore the soft-capping); what the user set is kept."""
    if "attn_implementation" in init_kwargs:
        return init_kwargs
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code).get_text_config()
    except (OSError, ValueError):
        return init_kwargs
    if getattr(cfg, "attn_logit_softcapping", None):
        return {**init_kwargs, "attn_implementation": "eager"}
    return init_kwargs


def token_identity(rows, sampled: dict, eos_ids=()) -> tuple[int, str]:
    """How many `rows` hold token ids the engine did not sample, and one example.

    rows: (prompt ids, completion ids as scored, model-token flags) per sequence; flags are False for tokens the
    engine did not generate (tool output). sampled: {prompt ids tuple: [completion ids tuple, ...]} as the engine
    generated them. A completion is walked from its prompt: each run of model tokens must be one of the engine's
    completions for the context so far. It may stop early only on one of `eos_ids` (TRL masks after any EOS id it
    knows, which the engine may not stop at); a completion cut anywhere else (e.g. EOS dropped by a decode) fails."""
    pool = {k: list(v) for k, v in sampled.items()}
    eos = set(eos_ids)
    bad, example = 0, ""
    for prompt, comp, is_model in rows:
        pos, ok = 0, True
        while pos < len(comp) and ok:
            if not is_model[pos]:
                pos += 1
                continue
            cands = pool.get(tuple(prompt) + tuple(comp[:pos]), [])
            match = next((c for c in cands if c and tuple(comp[pos:pos + len(c)]) == c[:len(comp) - pos]
                          and (pos + len(c) <= len(comp) or comp[-1] in eos)), None)
            if match is None:
                ok = False
                seen = cands[0] if cands else None
                example = example or (f"scored {list(comp[pos:pos + 8])}..., engine sampled "
                                      f"{list(seen[:8]) if seen else 'nothing for this context'}...")
            else:
                cands.remove(match)
                pos += len(match)
        bad += not ok
    return bad, example
