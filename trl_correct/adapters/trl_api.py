"""The one boundary to TRL's (and transformers') internals: every private name trl-correct relies on, with the TRL
releases it was read in, and the accessors the rest of the package calls instead of reaching in.

A TRL upgrade is a review of this file: `problems()` compares every entry of `PRIVATE` with the installed TRL (the
attribute exists; a method still takes the arguments we pass) and `tests/test_trl_api.py` fails naming the one that
moved. Outside `VERIFIED_TRL` the trainer warns once at construction, listing what `problems()` found.

Also here: the checks TRL's own `__init__` runs only when it builds its engine (trl-correct builds the parent with
`use_vllm=False` and its own engine in its place, `building_without_trl_engine`), run anyway by
`skipped_init_checks`; and TRL's config defaults read from `GRPOConfig` itself, not copied. Knows TRL; nothing of vLLM.
"""

import inspect
import logging
from contextlib import contextmanager
from dataclasses import dataclass, fields

import trl
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint  # noqa: F401 (re-exported)
from trl import GRPOConfig, GRPOTrainer
from trl.trainer import utils as trl_utils
from trl.trainer.utils import (FusedCausalLMOutput, add_fused_lm_head, create_model_from_path,  # noqa: F401
                               pad)

logger = logging.getLogger("trl_correct")

VERIFIED_TRL = ("1.16",)  # major.minor releases every entry below was read in


@dataclass(frozen=True)
class Private:
    """One private name: where it lives, what kind, the argument names we pass (methods), and what we use it for."""

    owner: str  # "GRPOTrainer", "Trainer" (transformers), "trl.trainer.utils", "GRPOTrainer instance"
    name: str
    kind: str  # method | attribute | function | class
    args: tuple = ()
    why: str = ""


PRIVATE = (
    Private("GRPOTrainer", "_generate_and_score_completions", "method", ("inputs",),
            "extended: per-batch checks on old_per_token_logps / sampling_per_token_logps / completion_mask"),
    Private("GRPOTrainer", "_get_per_token_logps_and_entropies", "method",
            ("model", "input_ids", "attention_mask", "logits_to_keep", "batch_size"),
            "the trainer's own scoring path for the probe, the floors and self-consistency"),
    Private("GRPOTrainer", "_tokenize_prompts", "method", ("prompts",), "probe prompts tokenised as TRL does"),
    Private("GRPOTrainer", "_generate", "method", ("prompts",), "the gate's dry batch through TRL's generation"),
    Private("GRPOTrainer", "_generate_single_turn", "method",
            ("prompt_ids", "images", "multimodal_fields", "num_generations"), "faults: token_retokenized"),
    Private("GRPOTrainer", "_compute_loss", "method", ("model", "inputs"), "tests record the loss inputs"),
    Private("Trainer", "_save_checkpoint", "method", ("model", "trial"), "extended: gate state in every checkpoint"),
    Private("Trainer", "_load_from_checkpoint", "method", ("resume_from_checkpoint",),
            "a resume loads the checkpoint's weights before the gate"),
    Private("Trainer", "_get_output_dir", "method", ("trial",), "where _save_checkpoint wrote"),
    Private("trl.trainer.utils", "add_fused_lm_head", "function", ("model", "temperature", "cast_lm_head_to_fp32"),
            "the probe's second temperature re-installs TRL's fused head"),
    Private("trl.trainer.utils", "FusedCausalLMOutput", "class", (), "the processed head returns TRL's output type"),
    Private("trl.trainer.utils", "pad", "function", ("tensors", "padding_value", "padding_side"), "batch layout"),
    Private("trl.trainer.utils", "create_model_from_path", "function", ("model_id",),
            "verify loads an adapter's base model as TRL loads a policy"),
    Private("GRPOTrainer instance", "_dist", "attribute", (), "fsdp_version, is_zero3, gather_params"),
    Private("GRPOTrainer instance", "_metrics", "attribute", (), "TRL's per-step metrics (keys reward, "
            "completions/mean_length); the gate's audits cut back what they append"),
    Private("GRPOTrainer instance", "_tokenizer", "attribute", (), "pad_token_id of the scoring batch"),
    Private("GRPOTrainer instance", "_last_loaded_step", "attribute", (), "set after our own sync so TRL skips its"),
    Private("GRPOTrainer instance", "_entropy_window_stats", "optional attribute", (),
            "adaptive-entropy state, restored after the gate's audits"),
)
# TRL's metric keys read back after super()._generate_and_score_completions
METRIC_REWARD, METRIC_LENGTH = "reward", "completions/mean_length"

_OWNERS = {"GRPOTrainer": GRPOTrainer, "Trainer": Trainer, "trl.trainer.utils": trl_utils}


def problems(owners: dict | None = None, instance=None) -> list[str]:
    """Each private name that is missing or no longer takes the arguments we pass, in one line each. `owners` maps
    the owner names of `PRIVATE` to the objects to check (default: the installed TRL/transformers); `instance`: a
    built trainer, for the instance attributes (skipped when None)."""
    owners = {**_OWNERS, **(owners or {})}
    out = []
    for p in PRIVATE:
        if p.owner == "GRPOTrainer instance":
            if instance is not None and p.kind == "attribute" and not hasattr(instance, p.name):
                out.append(f"{p.owner}.{p.name}: missing ({p.why})")
            continue
        obj = getattr(owners[p.owner], p.name, None)
        if obj is None:
            out.append(f"{p.owner}.{p.name}: missing ({p.why})")
            continue
        if p.kind in ("method", "function"):
            params = inspect.signature(obj).parameters
            gone = [a for a in p.args if a not in params]
            if gone:
                out.append(f"{p.owner}.{p.name}: no longer takes {', '.join(gone)} ({p.why})")
    return out


def version_guard(instance) -> None:
    """Warn once when the installed TRL is not one `PRIVATE` was read in, naming what moved."""
    major_minor = ".".join(trl.__version__.split(".")[:2])
    if major_minor in VERIFIED_TRL:
        return
    found = problems(instance=instance)
    logger.warning("trl-correct: TRL %s is not one its private-API boundary was read in (%s)%s", trl.__version__,
                   ", ".join(VERIFIED_TRL), ": " + "; ".join(found) if found else "; every name it uses is present")


# -- TRL's config defaults and the checks its __init__ skips -----------------------------------------------------

def grpo_default(name: str):
    """TRL's default value of a GRPOConfig field (read from the dataclass, never copied)."""
    return next(f.default for f in fields(GRPOConfig) if f.name == name)


@contextmanager
def building_without_trl_engine(args):
    """Build GRPOTrainer without its own vLLM engine (trl-correct puts its `Engine` in its place afterwards)."""
    args.use_vllm = False
    try:
        yield
    finally:
        args.use_vllm = True


def skipped_init_checks(args) -> None:
    """What GRPOTrainer.__init__ checks only when it builds its engine (TRL 1.16), with our field names."""
    if args.loss_type == "vespo" and args.vllm_importance_sampling_correction and \
            args.vllm_importance_sampling_mode not in ("token_truncate", "token_mask"):
        raise ValueError(f"tis_mode={args.tis_mode!r} is invalid with loss_type=vespo: TRL's VESPO loss needs a "
                         "per-token weight; use tis_mode: token_truncate or token_mask")


# -- accessors ---------------------------------------------------------------------------------------------------

def score(trainer, input_ids, attention_mask, logits_to_keep: int, batch_size: int):
    """TRL's own logprobs (and entropies) of the last `logits_to_keep` tokens of each row."""
    return trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask, logits_to_keep,
                                                      batch_size=batch_size)


def tokenize_prompts(trainer, rows) -> list:
    ids, _, _ = trainer._tokenize_prompts(rows)
    return ids


def generate(trainer, prompts):
    """TRL's generation path (`_generate`): (prompt_ids, completion_ids, tool_mask, ...)."""
    return trainer._generate(prompts)


def metrics(trainer) -> dict:
    """TRL's per-mode metric lists ({"train": {key: [values]}, "eval": ...})."""
    return trainer._metrics


def dist(trainer):
    """TRL's distributed backend (fsdp_version, is_zero3, gather_params)."""
    return trainer._dist


def pad_token_id(trainer) -> int:
    return trainer._tokenizer.pad_token_id


def engine_current(trainer) -> bool:
    return trainer._last_loaded_step == trainer.state.global_step


def mark_engine_current(trainer, current: bool = True) -> None:
    """Tell TRL's loop the engine holds this step's weights (it then skips its own sync), or not (-1)."""
    trainer._last_loaded_step = trainer.state.global_step if current else -1


ENTROPY_STATE = ("_entropy_window_stats", "entropy_coef", "_last_world_entropy")  # restored after the audits
