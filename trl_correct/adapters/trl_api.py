"""The one boundary to TRL's (and transformers') internals: every private name trl-correct relies on, with the TRL
releases it was read in, and the accessors the rest of the package calls instead of reaching in.

A TRL (or transformers) upgrade is a review of this file: `problems()` compares every entry of `PRIVATE` with the
installed TRL and transformers (the attribute exists; a method still takes the arguments we pass; an instance
attribute is still assigned in the owner's source) and `tests/test_trl_api.py` fails naming the one that moved. Each
entry names the release it was read in (`read_in`: one of `VERIFIED_TRL` / `VERIFIED_TRANSFORMERS`). Outside those
releases the trainer warns once at construction, listing what `problems()` found. `tests/test_boundary.py` keeps the
rest of the package from reaching past this file: no private TRL/transformers name outside `adapters/`.

Also here: the checks TRL's own `__init__` runs only when it builds its engine (trl-correct builds the parent with
`use_vllm=False` and its own engine in its place, `building_without_trl_engine`), run anyway by
`skipped_init_checks`; and TRL's config defaults read from `GRPOConfig` itself, not copied. Knows TRL; nothing of vLLM.
"""

import ast
import functools
import inspect
import logging
import os
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Callable

import transformers
import trl
from transformers import PretrainedConfig, Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOConfig
from trl.trainer import utils as trl_utils
from trl.trainer.utils import (FusedCausalLMOutput, add_fused_lm_head, create_model_from_path,  # noqa: F401
                               pad)

logger = logging.getLogger("trl_correct")

VERIFIED_TRL = ("1.16",)  # major.minor releases every TRL entry below was read in
VERIFIED_TRANSFORMERS = ("5.19",)  # major.minor releases every transformers entry below was read in
TRL, TRANSFORMERS = f"trl {VERIFIED_TRL[-1]}", f"transformers {VERIFIED_TRANSFORMERS[-1]}"  # values of Private.read_in


@dataclass(frozen=True)
class Private:
    """One private name: where it lives, what kind, the argument names we pass (methods), what we use it for, and the
    release whose source it was read in ("trl 1.16", "transformers 5.19")."""

    owner: str  # "GRPOTrainer", "trl.trainer.utils", "GRPOTrainer instance"; transformers "Trainer", "PretrainedConfig"
    name: str
    kind: str  # method | attribute | class attribute | function | class | optional attribute (instances: may be unset)
    args: tuple = ()
    why: str = ""
    read_in: str = ""


PRIVATE = (
    Private("GRPOTrainer", "_generate_and_score_completions", "method", ("inputs",),
            "extended: per-batch checks on old_per_token_logps / sampling_per_token_logps / completion_mask", TRL),
    Private("GRPOTrainer", "_get_per_token_logps_and_entropies", "method",
            ("model", "input_ids", "attention_mask", "logits_to_keep", "batch_size"),
            "the trainer's own scoring path for the probe, the floors and self-consistency; faults: padding_attended",
            TRL),
    Private("GRPOTrainer", "_tokenize_prompts", "method", ("prompts",), "probe prompts tokenised as TRL does", TRL),
    Private("GRPOTrainer", "_generate", "method", ("prompts",), "the gate's dry batch through TRL's generation", TRL),
    Private("GRPOTrainer", "_generate_single_turn", "method",
            ("prompt_ids", "images", "multimodal_fields", "num_generations"), "faults: token_retokenized", TRL),
    Private("GRPOTrainer", "_compute_loss", "method", ("model", "inputs"), "tests record the loss inputs", TRL),
    Private("GRPOTrainer", "_tag_names", "class attribute", (), "extended: TRL's model-card tags plus ours", TRL),
    Private("Trainer", "_save_checkpoint", "method", ("model", "trial"), "extended: gate state in every checkpoint",
            TRANSFORMERS),
    Private("Trainer", "_load_from_checkpoint", "method", ("resume_from_checkpoint",),
            "a resume loads the checkpoint's weights before the gate", TRANSFORMERS),
    Private("Trainer", "_get_output_dir", "method", ("trial",), "where _save_checkpoint wrote", TRANSFORMERS),
    Private("PretrainedConfig", "_attn_implementation", "attribute", (),
            "the attention kernel a model config resolved to (a property, read on instances)", TRANSFORMERS),
    Private("PretrainedConfig", "_experts_implementation", "attribute", (),
            "the MoE experts kernel a model config resolved to (grouped_mm refuses float64: the fp64 reference runs "
            "eager)", TRANSFORMERS),
    Private("trl.trainer.utils", "add_fused_lm_head", "function", ("model", "temperature", "cast_lm_head_to_fp32"),
            "the probe's second temperature re-installs TRL's fused head", TRL),
    Private("trl.trainer.utils", "FusedCausalLMOutput", "class", (), "the processed head returns TRL's output type",
            TRL),
    Private("trl.trainer.utils", "pad", "function", ("tensors", "padding_value", "padding_side"), "batch layout", TRL),
    Private("trl.trainer.utils", "create_model_from_path", "function", ("model_id",),
            "verify loads an adapter's base model as TRL loads a policy", TRL),
    Private("GRPOTrainer instance", "_dist", "attribute", (), "fsdp_version, is_zero3, gather_params", TRL),
    Private("GRPOTrainer instance", "_metrics", "attribute", (), "TRL's per-step metrics (keys reward, "
            "completions/mean_length); the gate's audits cut back what they append", TRL),
    Private("GRPOTrainer instance", "_tokenizer", "attribute", (), "pad_token_id of the scoring batch", TRL),
    Private("GRPOTrainer instance", "_last_loaded_step", "attribute", (), "set after our own sync so TRL skips its",
            TRL),
    Private("GRPOTrainer instance", "_entropy_window_stats", "optional attribute", (),
            "adaptive-entropy state, restored after the gate's audits (ENTROPY_STATE)", TRL),
    Private("GRPOTrainer instance", "_last_world_entropy", "optional attribute", (),
            "adaptive-entropy state, restored after the gate's audits (ENTROPY_STATE)", TRL),
)
# TRL's metric keys read back after super()._generate_and_score_completions
METRIC_REWARD, METRIC_LENGTH = "reward", "completions/mean_length"


def _grpo_trainer():
    """TRL's GRPOTrainer, imported when first needed: importing it imports vLLM (TRL's generation module, ~10 s), which
    `import trl_correct` (the config, the CLI's light commands, the pure tests) must not pay for."""
    from trl import GRPOTrainer

    return GRPOTrainer


def _owners() -> dict:
    return {"GRPOTrainer": _grpo_trainer(), "Trainer": Trainer, "PretrainedConfig": PretrainedConfig,
            "trl.trainer.utils": trl_utils}


_INSTANCE = " instance"  # "GRPOTrainer instance": an attribute set on the built object, owned by the class before it


@functools.lru_cache(maxsize=None)
def _instance_attributes(klass) -> frozenset:
    """The names `klass`'s own source assigns on `self` (`self.x = ...`, `self.x: T = ...`, `self.x += ...`)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
    except (OSError, TypeError):  # built in, or defined where no source is kept
        return frozenset()
    return frozenset(n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)
                     and isinstance(n.value, ast.Name) and n.value.id == "self")


def _assigned_in_source(cls, name: str) -> bool:
    """Whether `self.<name>` is assigned in the source of `cls` or a class it inherits from (TRL and transformers set
    their instance attributes in __init__ and the methods it calls)."""
    return any(name in _instance_attributes(klass) for klass in cls.__mro__ if klass is not object)


def problems(owners: dict | None = None, instance=None) -> list[str]:
    """Each private name that is missing or no longer takes the arguments we pass, in one line each. `owners` maps
    the owner names of `PRIVATE` to the objects to check (default: the installed TRL/transformers). An instance
    attribute ("GRPOTrainer instance") must still be assigned in the source of its class (so a rename of an optional
    one is named too, not skipped); with `instance` (a built trainer) a non-optional one must also be set on it."""
    owners = {**_owners(), **(owners or {})}
    out = []
    for p in PRIVATE:
        if p.owner.endswith(_INSTANCE):
            if not _assigned_in_source(owners[p.owner.removesuffix(_INSTANCE)], p.name):
                out.append(f"{p.owner}.{p.name}: no longer assigned in {p.owner.removesuffix(_INSTANCE)} ({p.why})")
            elif instance is not None and p.kind == "attribute" and not hasattr(instance, p.name):
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


def registered(name: str, kinds: tuple = ()) -> Private:
    """The entry of `PRIVATE` for `name` (of one of `kinds`, when given); ValueError when there is none."""
    for p in PRIVATE:
        if p.name == name and (not kinds or p.kind in kinds):
            return p
    raise ValueError(f"{name} is not a private name registered in trl_api.PRIVATE"
                     + (f" as a {' or '.join(kinds)}" if kinds else "") + ": register it (with the release it was "
                     "read in) before using it")


def _major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def version_guard(instance) -> None:
    """Warn once when the installed TRL or transformers is not one `PRIVATE` was read in, naming what moved."""
    unread = [f"{lib} {version} is not one its private-API boundary was read in ({', '.join(read)})"
              for lib, version, read in (("TRL", trl.__version__, VERIFIED_TRL),
                                         ("transformers", transformers.__version__, VERIFIED_TRANSFORMERS))
              if _major_minor(version) not in read]
    if not unread:
        return
    found = problems(instance=instance)
    logger.warning("trl-correct: %s%s", "; ".join(unread),
                   ": " + "; ".join(found) if found else "; every name it uses is present")


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


# TRL's adaptive-entropy state, restored after the audits (its private names are registered in PRIVATE)
ENTROPY_STATE = ("_entropy_window_stats", "entropy_coef", "_last_world_entropy")


def tag_names(*extra: str) -> list[str]:
    """GRPOTrainer's model-card tags with `extra` added (a subclass's `_tag_names`)."""
    return [*_grpo_trainer()._tag_names, *extra]


def checkpoint_folder(trainer, trial=None) -> str:
    """The folder `_save_checkpoint` just wrote (transformers' `_get_output_dir` + checkpoint-<step>)."""
    return os.path.join(trainer._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}")


def load_checkpoint_weights(trainer, checkpoint: str) -> None:
    """Load a checkpoint's model weights into `trainer` now (transformers' `_load_from_checkpoint`)."""
    trainer._load_from_checkpoint(checkpoint)


def patch_method(trainer, name: str, fn) -> Callable[[], None]:
    """Replace the registered private method `name` on one trainer instance (faults, tests): the instance then calls
    `fn(real, *args, **kwargs)`, `real` being the bound method it had. Returns the undo. Only names registered in
    `PRIVATE` as a method are accepted, so no patch outlives a rename unnoticed."""
    registered(name, kinds=("method",))
    real = getattr(trainer, name)
    missing = object()
    before = trainer.__dict__.get(name, missing)

    def patched(*args, **kwargs):
        return fn(real, *args, **kwargs)

    setattr(trainer, name, patched)

    def undo() -> None:
        if before is missing:
            trainer.__dict__.pop(name, None)
        else:
            setattr(trainer, name, before)

    return undo


def attention_implementation(model) -> str | None:
    """The attention kernel `model`'s (text) config resolved to (PretrainedConfig._attn_implementation)."""
    return getattr(model.config.get_text_config(), "_attn_implementation", None)


def experts_implementation(model) -> str | None:
    """The mixture-of-experts kernel `model`'s (text) config resolved to (PretrainedConfig._experts_implementation,
    transformers >= 5: grouped_mm, batched_mm or eager); None for a model without one."""
    return getattr(model.config.get_text_config(), "_experts_implementation", None)
