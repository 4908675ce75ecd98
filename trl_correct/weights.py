"""The policy's weights as the engine receives them: (name, tensor) pairs in checkpoint format.

A plain model streams its parameters as they are. A PEFT (LoRA) model streams its base weights with every active
adapter's delta added (base + B A x scaling, computed fresh from the frozen base each time: nothing is merged in place,
so no rounding accumulates in the trainer's base weights over steps), under the base model's names; the adapter's
own tensors never reach the engine. Knows PEFT's naming; nothing of vLLM.
"""

from accelerate.utils import is_peft_model


def policy_weights(model):
    """Yield (checkpoint name, tensor) for `model` (unwrapped; a PreTrainedModel or a PeftModel)."""
    if not is_peft_model(model):
        for name, p in model.named_parameters():
            yield name, p.detach()
        return
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
        t = p.detach()
        if name in deltas:
            t = t + deltas[name].to(t.dtype)
        yield name.removeprefix("base_model.model.").replace(".base_layer", "").replace("modules_to_save.default.",
                                                                                          ""), t


def scoring_model(model):
    """The module whose forward TRL patches with its fused head (the base model under a PEFT wrapper)."""
    return model.get_base_model() if is_peft_model(model) else model
