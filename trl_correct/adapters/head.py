"""The trainer's scoring head under the engine's full sampler transform.

TRL 1.16 patches the policy's forward with a fused LM head that divides by the temperature and nothing else
(`trl.trainer.utils.add_fused_lm_head`). When the sampler does more (top-k/top-p/min-p, penalties), `add_processed_head`
wraps that forward: calls with `fused_lm_head=True` (every trainer logprob TRL computes: old policy, loss) return the
logprobs of sampler.py's transform instead, with the same output type; any other call goes to TRL's forward.
Knows the HF/TRL model contract; nothing of vLLM.
"""

import functools
import types
from contextlib import nullcontext

import torch

from ..core.sampler import VLLM_V1_ORDER, SamplerSpec, history, token_logprobs
from .trl_api import FusedCausalLMOutput


def why_unreproducible(model, spec: SamplerSpec) -> str | None:
    """None, or why this trainer cannot score `model` under `spec` (a gate failure with cause `sampler`)."""
    if spec.transforms and tuple(spec.order) != VLLM_V1_ORDER:
        return f"the engine's sampler order {list(spec.order)} is not the one sampler.py implements"
    cfg = model.config.get_text_config()
    scaled = [k for k in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                          "logits_scaling") if getattr(cfg, k, None) not in (None, 1.0)]
    if scaled and spec.transforms:
        return f"the model rescales its logits ({', '.join(scaled)}), which the processed head does not reproduce"
    return None


def add_processed_head(model, spec: SamplerSpec, fp32_lm_head: bool) -> None:
    """Make `model(..., labels=, fused_lm_head=True)` return logprobs under `spec` (see module docstring)."""
    trl_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        if not fused_lm_head or shift_labels is not None:
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        input_ids, attention_mask = kwargs["input_ids"], kwargs["attention_mask"]
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        labels = labels[:, 1:]
        mask = labels != -100
        head = self.get_output_embeddings()
        hist = None
        if spec.needs_history:  # completions start where the first label does (prompts are left-padded)
            start = int(mask.any(0).nonzero()[0]) + 1 if mask.any() else input_ids.size(1)
            ids, seen, counts = history(input_ids[:, :start], attention_mask[:, :start], input_ids[:, start:])
            rows, cols = mask.nonzero(as_tuple=True)
            t = cols + 1 - start  # position of each scored token within its completion
            hist = (ids[rows], seen[rows, t], counts[rows, t])
        weight, bias = head.weight, head.bias
        ctx = nullcontext()
        h = hidden[mask]
        if fp32_lm_head:
            h, weight = h.float(), weight.float()
            bias = None if bias is None else bias.float()
            ctx = torch.autocast(h.device.type, enabled=False)
        with ctx:
            lp, ent, _ = token_logprobs(h, weight, bias, labels[mask], spec, hist)
        log_probs = lp.new_zeros(mask.shape).masked_scatter(mask, lp)
        entropy = ent.new_zeros(mask.shape).masked_scatter(mask, ent)
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / denom, log_probs=log_probs, entropy=entropy,
                                   label_mask=mask)

    model.forward = types.MethodType(forward, model)
    forward.trl_forward = trl_forward


def remove_processed_head(model) -> None:
    """Undo `add_processed_head`: back to TRL's temperature-only head (the doctor's and tests' ablation)."""
    trl_forward = getattr(model.forward, "trl_forward", None)
    if trl_forward is not None:
        model.forward = trl_forward
