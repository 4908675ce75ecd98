"""The policy's weights as the engine receives them: (name, tensor) pairs in checkpoint format.

A plain model streams its parameters as they are. A PEFT (LoRA) model streams its base weights with every active
adapter's delta added (base + B A x scaling, computed fresh from the frozen base each time: nothing is merged in place,
so no rounding accumulates in the trainer's base weights over steps), under the base model's names; the adapter's
own tensors never reach the engine. Sharded training (DeepSpeed ZeRO-3, FSDP2) gathers each parameter whole before it
is streamed: every rank feeds its own colocated engine the full model. Knows PEFT's naming; nothing of vLLM.
"""

import sys
from contextlib import contextmanager


def is_peft_model(model) -> bool:
    """A PEFT-wrapped model? (accelerate's is_peft_model reads package metadata on every call: 3.7 ms per sync
    on the tiny model, most of our per-step overhead; a model can only be a PeftModel once peft is imported.)"""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, (peft.PeftModel, getattr(peft, "PeftMixedModel", peft.PeftModel)))


def _full(p, zero3: bool):
    """The whole tensor of a parameter: FSDP2 shards are DTensors (all-gathered: a collective, every rank walks the
    parameters in the same order); a ZeRO-3 parameter gathered for the caller's `with` is copied out of it."""
    t = p.detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.clone() if zero3 else t


def policy_weights(model, dist=None):
    """Yield (checkpoint name, tensor) for `model` (unwrapped; a PreTrainedModel or a PeftModel). `dist`: TRL's
    DistributedBackend; under DeepSpeed ZeRO-3 each parameter (all of them at once for PEFT, whose deltas need the
    whole layer) is gathered while it is read."""
    zero3 = bool(dist and dist.is_zero3)
    gather = dist.gather_params if dist is not None else _no_gather
    if not is_peft_model(model):
        if _converted(model):  # streamed as a checkpoint holds them (save_pretrained's names and layout)
            from transformers.core_model_loading import revert_weight_conversion

            with gather(list(model.parameters())):  # the conversion needs the whole state dict at once
                yield from revert_weight_conversion(
                    model, {n: _full(p, zero3) for n, p in model.named_parameters()}).items()
            return
        for name, p in model.named_parameters():
            with gather([p]):
                yield name, _full(p, zero3)
        return
    with gather(list(model.parameters())):
        yield from _peft_weights(model, zero3)


_CONVERTED: dict = {}  # model class -> whether transformers converts its checkpoint weights on load


def _converted(model) -> bool:
    """Whether transformers renames or fuses this model's weights on load (transformers 5: e.g. Mixtral's
    block_sparse_moe.experts.{e}.w1/w2/w3 become mlp.experts.gate_up_proj/down_proj), so that the names it holds are
    not a checkpoint's: vLLM loads checkpoint names only (measured: "There is no module or parameter named
    'layers.0.mlp' in MixtralModel"). Models loaded under their checkpoint names stream as they are."""
    cls = type(model)
    if cls not in _CONVERTED:
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import PrefixChange

            mapping = get_model_conversion_mapping(model, add_legacy=False)
            _CONVERTED[cls] = any(not isinstance(x, PrefixChange) for x in mapping or [])
        except ImportError:  # a transformers without weight conversions: names are the checkpoint's
            _CONVERTED[cls] = False
    return _CONVERTED[cls]


@contextmanager
def _no_gather(params):
    yield


def _peft_weights(model, zero3: bool):
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and not mod.merged:
            active = [a for a in mod.active_adapters if a in mod.lora_A]
            if active:
                deltas[f"{mod_name}.base_layer.weight"] = sum(mod.get_delta_weight(a) for a in active)
    for name, p in model.named_parameters():
        if model.prefix in name or "original_module" in name:  # adapter tensors; the copy modules_to_save replaced
            continue
        t = _full(p, zero3)
        if name in deltas:
            t = t + deltas[name].to(t.dtype)
        yield name.removeprefix("base_model.model.").replace(".base_layer", "").replace("modules_to_save.default.",
                                                                                          ""), t


def scoring_model(model):
    """The module whose forward TRL patches with its fused head (the base model under a PEFT wrapper)."""
    return model.get_base_model() if is_peft_model(model) else model
