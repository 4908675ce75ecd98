"""The main job: GRPO with CorrectGRPOTrainer from a YAML recipe.

    accelerate launch --config_file accelerate_configs/cpu.yaml -m trl_correct.train --config recipes/tiny.yaml
    trl-correct train --config recipes/tiny.yaml [--field value ...]     # the same, flags override the recipe

`model_name_or_path` is a local HF model directory, a hub name (when the user has it), or `trl-correct/tiny` (the
embedded model, built and cached on first use). `dataset_name` is a local dataset (directory, or .json/.jsonl/.csv/
.parquet file with a `prompt` column), a hub name, or `trl-correct/tiny-prompts`. After training the model is saved
into `output_dir` with its parity certificate (correctness_certificate.json) and model card (README.md); `trl-correct
verify OUTPUT_DIR` re-checks it.

What the user gave is checked before any engine is built, in this order, each problem one line naming the field or
file, what was found and the fix (trl_correct.errors; exit code 2, no traceback unless --debug or
TRL_CORRECT_DEBUG=1): the recipe (file, YAML syntax with line and column, a mapping, unknown fields with the closest
known name, value types), the flags (unknown ones likewise; argparse's invalid choices and values as one line), the
config's own checks (config.py), output_dir (another run holds it; a run there that this one would overwrite without
--overwrite_output_dir), resume_from_checkpoint (missing or partial: checkpoints.py), the model (a folder with a
config, weights and tokenizer, or a hub name resolvable here), the reward functions (importable, callable), the dataset
(readable, its prompt column there, not empty, every prompt text or chat messages). While training, a reward that
raises or returns a non-finite value is named (errors.RewardError). A gate failure exits 1 with its report.
"""

import contextlib
import functools
import importlib
import inspect
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field

from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from .. import checkpoints
from ..config import CorrectGRPOConfig, declared_types, type_problem
from ..console import cli_logging, note_vllm_release
from ..errors import (ConfigError, DatasetError, ModelError, OutputDirError, RecipeError, RewardError, UserError,
                      did_you_mean, one_line)
from ..tasks.tiny import TINY_MODEL, TINY_PROMPTS, tiny_model_dir, tiny_prompts

logger = logging.getLogger("trl_correct")


@dataclass
class TrainScriptArguments(ScriptArguments):
    dataset_name: str | None = field(default=TINY_PROMPTS, metadata={"help": "Prompt dataset (see module doc)."})
    reward_funcs: list[str] = field(default_factory=lambda: ["trl_correct.tasks.tiny.keyword_reward"], metadata={
        "help": "Reward functions as dotted paths module.function (TRL reward-function signature)."})
    prompt_column: str = field(default="prompt", metadata={
        "help": "Dataset column holding the prompt (e.g. question for GSM8K); other columns reach the rewards."})
    chat_prompts: bool = field(default=False, metadata={
        "help": "Wrap each prompt as a user message (plus system_prompt) so the model's chat template applies."})
    system_prompt: str | None = field(default=None, metadata={"help": "System message for chat_prompts."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Train from scratch into an output_dir that already holds a run's checkpoints or saved model (they "
                "are overwritten as this run saves). Without it such a run is refused; --resume_from_checkpoint true "
                "continues it instead."})


PARSED = (TrainScriptArguments, CorrectGRPOConfig, ModelConfig)
DATA_EXTENSIONS = {"json": "json", "jsonl": "json", "csv": "csv", "parquet": "parquet"}
# reward modules that moved with the package layout (recipes written before it keep working)
MOVED_MODULES = {"trl_correct.tiny": "trl_correct.tasks.tiny", "trl_correct.rewards": "trl_correct.tasks.rewards"}


# -- the recipe and the flags -----------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def known_fields() -> dict:
    """{field: declared type} of every field a recipe or flag may set."""
    return declared_types(*PARSED)


def _field_of_flag(name: str) -> str | None:
    """The field a flag `--name` sets (dashes or underscores; --no_X for a bool X), or None when there is none."""
    name = name.replace("-", "_")
    if name in known_fields():
        return name
    if name.startswith("no_") and known_fields().get(name[3:]) is bool:
        return name[3:]
    return None


def load_recipe(path: str) -> dict:
    """The recipe at `path` as a dict, checked: the file, its YAML syntax (file:line:column), a mapping, `env` a
    mapping, every field known (else the closest known name), every value of its field's type."""
    import yaml

    if not os.path.isfile(path):
        why = "is a folder" if os.path.isdir(path) else "does not exist"
        raise RecipeError(f"--config {path} {why}; give a recipe YAML file (e.g. recipes/tiny.yaml)")
    try:
        with open(path) as f:
            recipe = yaml.safe_load(f)
    except yaml.MarkedYAMLError as e:
        mark, ctx = e.problem_mark or e.context_mark, e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        what = e.problem or e.context or "not valid YAML"
        if e.context and e.problem and ctx is not None:  # e.g. a bracket opened earlier and never closed
            what += f" ({e.context} at line {ctx.line + 1}, column {ctx.column + 1})"
        raise RecipeError(f"{where}: YAML syntax error: {what}; fix the recipe there") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: not readable as YAML ({one_line(e)}); give a recipe YAML file") from None
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping of field: value, found {type(recipe).__name__}; write "
                          "one field per line (e.g. learning_rate: 1.0e-3)")
    if not isinstance(recipe.get("env", {}), dict):
        raise RecipeError(f"{path}: env must be a mapping of VARIABLE: value, found {type(recipe['env']).__name__}")
    known = known_fields()
    unknown = [k for k in recipe if k != "env" and k not in known]
    if unknown:
        k = unknown[0]
        more = f" (and {', '.join(map(str, unknown[1:]))})" if len(unknown) > 1 else ""
        raise RecipeError(f"{path}: unknown field {k}{did_you_mean(str(k), known)}{more}; fix its name or remove it")
    for k, v in recipe.items():
        if k == "env":
            continue
        wrong = type_problem(v, known[k], strings_convert=True)
        if wrong:
            raise ConfigError(f"{k}={v!r} in {path} is invalid: it is {wrong}; fix its value")
    return recipe


def _split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the --config path or None, the other arguments)."""
    rest, path, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a == "--config":
            if i + 1 >= len(argv):
                raise RecipeError("--config needs a value: give a recipe YAML file (e.g. --config recipes/tiny.yaml)")
            path, i = argv[i + 1], i + 2
            continue
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return path, rest


def check_flags(argv: list[str]) -> None:
    """Every --flag names a field (else: the closest known name)."""
    for a in argv:
        if a.startswith("--") and len(a) > 2 and a != "--help":
            name = a[2:].split("=", 1)[0]
            if _field_of_flag(name) is None:
                raise RecipeError(f"unknown field {name}{did_you_mean(name.replace('-', '_'), known_fields())} "
                                  f"(flag {a.split('=', 1)[0]}); fix its name or remove it")


class _Parser(TrlParser):
    """TRL's parser whose argparse errors are one line (errors.ConfigError) instead of the 200-line usage."""

    def error(self, message):
        raise ConfigError(argparse_words(message))


def argparse_words(message: str) -> str:
    """argparse's error message as trl-correct says it: the flag, the value, what is accepted."""
    m = re.match(r"argument (--[\w-]+)(?:/--[\w-]+)*: invalid choice: '(.*)' \(choose from (.*)\)$", message)
    if m:
        flag, value, choices = m.groups()
        names = [c.strip().strip("'\"") for c in choices.split(",")]
        return (f"{flag} {value} is invalid: choose from {', '.join(names)}{did_you_mean(value, names)}")
    m = re.match(r"argument (--[\w-]+)(?:/--[\w-]+)*: invalid (\w+) value: '(.*)'$", message)
    if m:
        flag, kind, value = m.groups()
        want = {"int": "an integer", "float": "a number"}.get(kind, f"a {kind}")
        return f"{flag} {value} is invalid: it must be {want}"
    m = re.match(r"the following arguments are required: (.*)$", message)
    if m:
        return f"{m.group(1)} is required: give it (see --help)"
    m = re.match(r"argument (--[\w-]+)(?:/--[\w-]+)*: (.*)$", message)
    if m:
        return f"{m.group(1)} is invalid: {m.group(2)}"
    return message


def parse(argv: list[str] | None = None):
    """(script_args, config, model_args) from a recipe plus flags, every problem a one-line errors.UserError."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path, rest = _split_config(argv)
    if path:
        load_recipe(path)  # the recipe's own checks, each a one-line error, before TRL's parser reads it
    check_flags(rest)
    parser = _Parser(PARSED)
    try:
        if path:
            return parser.parse_args_and_config(args=["--config", path, *rest])
        return parser.parse_args_and_config(args=rest)
    except UserError:
        raise
    except ValueError as e:  # raised by the dataclasses' own checks (ours, TRL's, transformers') on the user's values
        text = one_line(e)
        m = re.match(r"Some specified arguments are not used by the HfArgumentParser: (.*)$", text)
        if m:
            raise RecipeError(f"unexpected arguments {m.group(1)}: give every field as --field value") from None
        raise ConfigError(_named(text)) from e


# transformers' / TRL's messages that do not name their field: (message start, the field and the fix)
UNNAMED = (("Your setup doesn't support bf16/gpu", "bf16=True is invalid: this machine has no GPU with bfloat16; set "
            "bf16: false (fp32), or use_cpu: true to run bf16 on the CPU"),
           ("generation_batch_size (", "per_device_train_batch_size is invalid: TRL's generation_batch_size (the "
            "per-device batch x steps_per_generation x processes) must be a multiple of num_generations; change "
            "either"))


def _named(text: str) -> str:
    return next((f"{named} ({text})" for start, named in UNNAMED if text.startswith(start)), text)


# -- output_dir -------------------------------------------------------------------------------------------------------

SAVED_MODEL_FILES = (checkpoints.CERTIFICATE_FILE, "model.safetensors", "model.safetensors.index.json",
                     "adapter_model.safetensors", "pytorch_model.bin")


def check_output_dir(args, script_args, resume: str | None) -> None:
    """A fresh run (no resume) into an output_dir holding a run's checkpoints or saved model would overwrite them:
    refused unless --overwrite_output_dir true."""
    if resume or script_args.overwrite_output_dir or not os.path.isdir(args.output_dir):
        return
    found = [os.path.basename(p) for _, p in checkpoints.checkpoints_in(args.output_dir)]
    found += [f for f in SAVED_MODEL_FILES if os.path.exists(os.path.join(args.output_dir, f))]
    if found:
        more = f" and {len(found) - 3} more" if len(found) > 3 else ""
        raise OutputDirError(f"output_dir={args.output_dir!r} is invalid: it holds a previous run "
                             f"({', '.join(found[:3])}{more}) that this run would overwrite; continue it with "
                             "--resume_from_checkpoint true, give another output_dir, or pass --overwrite_output_dir "
                             "true")


# -- the model --------------------------------------------------------------------------------------------------------

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def resolve_model(name: str | None) -> str:
    if name in (None, TINY_MODEL):
        return str(tiny_model_dir())
    return name


def _offline() -> bool:
    on = ("1", "true", "yes", "on")
    return any(os.environ.get(v, "").strip().lower() in on for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_model(name: str | None) -> str:
    """The model's path or hub name, once it is known to be usable here: a folder with a config (loadable by
    transformers), weights and a tokenizer, or a hub name in the local cache (or reachable: not offline)."""
    path = resolve_model(name)
    field_ = f"model_name_or_path={name!r}"
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            return path  # an adapter folder: its base model is loaded by TRL / PEFT
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelError(f"{field_} is invalid: the folder has no config.json (not a saved model); give the "
                             f"folder save_pretrained wrote, a hub name, or {TINY_MODEL}")
        if not any(os.path.exists(os.path.join(path, f)) for f in WEIGHT_FILES):
            raise ModelError(f"{field_} is invalid: the folder has no weights ({WEIGHT_FILES[0]} or "
                             f"{WEIGHT_FILES[2]}); give a folder save_pretrained wrote the model into")
        if not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
            raise ModelError(f"{field_} is invalid: the folder has no tokenizer ({TOKENIZER_FILES[0]} or "
                             f"{TOKENIZER_FILES[1]}); save the tokenizer into it (tokenizer.save_pretrained)")
        from transformers import AutoConfig

        try:
            AutoConfig.from_pretrained(path)
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"{field_} is invalid: its config.json does not load ({one_line(e)[:240]}); fix or "
                             "re-save the model") from e
        return path
    if os.path.exists(path):
        raise ModelError(f"{field_} is invalid: it is a file, not a model folder; give the folder that holds "
                         "config.json")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        looks_like_hub = not path.startswith((".", "/", "~")) and path.count("/") <= 1
        validate_repo_id(path)
    except HFValidationError:
        looks_like_hub = False
    if not looks_like_hub:
        raise ModelError(f"{field_} is invalid: no such folder, and not a hub name (org/name); give a local model "
                         f"folder, a hub name, or {TINY_MODEL} (the embedded model)")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(path, "config.json"), str):
        return path
    if _offline():
        raise ModelError(f"{field_} is invalid: not a local folder, not in the Hugging Face cache, and the hub is "
                         f"offline (HF_HUB_OFFLINE=1); download it first (hf download {path}) or give a local folder")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:  # one request, no retries: transformers' own download retries for a minute before it says the same
        HfApi().model_info(path, timeout=10)
    except GatedRepoError:
        raise ModelError(f"{field_} is invalid: a gated repository this machine has no access to; accept its "
                         "terms on the hub and log in (hf auth login), or give a local folder") from None
    except RepositoryNotFoundError:
        raise ModelError(f"{field_} is invalid: no such folder here and no such model on the hub; check the name, "
                         "or log in if it is private (hf auth login)") from None
    except Exception as e:  # the hub cannot be reached (DNS, proxy, timeout): what the user must fix is the same
        raise ModelError(f"{field_} is invalid: not a local folder, not in the Hugging Face cache, and the hub "
                         f"cannot be reached ({type(e).__name__}: {one_line(e)[:120]}); download it where the hub "
                         "is reachable, or give a local folder") from None
    return path


LOADING_MODULES = ("transformers/modeling_utils", "transformers/models/auto", "transformers/configuration_utils",
                   "transformers/tokenization", "transformers/processing_utils", "transformers/utils/hub",
                   "safetensors", "huggingface_hub", "peft/")


def _raised_in(e: BaseException, parts) -> bool:
    tb = e.__traceback__
    files = []
    while tb is not None:
        files.append(tb.tb_frame.f_code.co_filename.replace(os.sep, "/"))
        tb = tb.tb_next
    return any(p in f for f in files for p in parts)


# -- rewards ----------------------------------------------------------------------------------------------------------

def load_reward(path: str):
    """The reward function at dotted `path` (module.function), wrapped so that raising or returning a non-finite
    value while training is an errors.RewardError naming it."""
    if not isinstance(path, str) or "." not in path.strip("."):
        raise RewardError(f"reward_funcs: {path!r} is not a dotted path; give module.function (e.g. "
                          "trl_correct.tasks.tiny.keyword_reward)")
    module, _, name = path.rpartition(".")
    module = MOVED_MODULES.get(module, module)
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise RewardError(f"reward_funcs: cannot import {path!r} ({one_line(e)}); give module.function") from None
    if not callable(fn):
        raise RewardError(f"reward_funcs: {path} is a {type(fn).__name__}, not a function; give module.function")
    return checked_reward(fn, path)


def _check_rewards(values, path: str, kwargs: dict):
    n = len(kwargs.get("completions") or kwargs.get("prompts") or [])
    if not isinstance(values, (list, tuple)):
        raise RewardError(f"reward_funcs: {path} returned {type(values).__name__}; return a list with one float per "
                          "completion")
    if n and len(values) != n:
        raise RewardError(f"reward_funcs: {path} returned {len(values)} rewards for {n} completions; return one "
                          "float per completion")
    for i, v in enumerate(values):
        if v is None:  # TRL's "not applicable to this sample"
            continue
        try:
            finite = math.isfinite(float(v))
        except (TypeError, ValueError):
            raise RewardError(f"reward_funcs: {path} returned {v!r} ({type(v).__name__}) for completion {i}; a "
                              "reward is a number (None: not applicable to this sample)") from None
        if not finite:
            raise RewardError(f"reward_funcs: {path} returned {v} for completion {i} (of {len(values)}); a reward "
                              "must be finite (None: not applicable to this sample)")
    return values


def checked_reward(fn, path: str):
    """`fn` with its results checked (a list of finite numbers or None, one per completion) and its exceptions
    turned into errors.RewardError naming `path` (the original chained: --debug shows it). Same name for TRL."""
    def raised(e):
        return RewardError(f"reward_funcs: {path} raised {type(e).__name__}: {one_line(e)[:200]}; fix the function "
                           "(--debug shows its traceback)")

    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def reward(*args, **kwargs):
            try:
                values = await fn(*args, **kwargs)
            except UserError:
                raise
            except Exception as e:
                raise raised(e) from e
            return _check_rewards(values, path, kwargs)
    else:
        @functools.wraps(fn)
        def reward(*args, **kwargs):
            try:
                values = fn(*args, **kwargs)
            except UserError:
                raise
            except Exception as e:
                raise raised(e) from e
            return _check_rewards(values, path, kwargs)
    return reward


# -- the dataset ------------------------------------------------------------------------------------------------------

def load_prompts(args: TrainScriptArguments):
    if args.dataset_name == TINY_PROMPTS:
        return tiny_prompts()
    data = _load_dataset(args)
    name = f"dataset_name={args.dataset_name!r}"
    if args.prompt_column not in data.column_names:
        raise DatasetError(f"prompt_column={args.prompt_column!r} is invalid: {args.dataset_name} has columns "
                           f"{data.column_names}; name the one holding the prompt")
    if len(data) == 0:
        raise DatasetError(f"{name} is invalid: it has no rows (split {args.dataset_train_split}); give a dataset "
                           "with prompts")
    for i, p in enumerate(data[args.prompt_column]):
        why = _bad_prompt(p, args.chat_prompts)
        if why:
            raise DatasetError(f"{name} is invalid: row {i}: the {args.prompt_column} {why}; every prompt must be "
                               "non-empty text" + ("" if args.chat_prompts else " (or a list of chat messages)"))
    if args.prompt_column != "prompt":
        data = data.rename_column(args.prompt_column, "prompt")
    if args.chat_prompts:
        system = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
        data = data.map(lambda row: {"prompt": system + [{"role": "user", "content": row["prompt"]}]})
    return data


def _bad_prompt(p, chat_prompts: bool) -> str | None:
    if isinstance(p, str):
        return "is empty" if not p.strip() else None
    if isinstance(p, list) and not chat_prompts and p and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in p):
        return None  # conversational: TRL applies the chat template
    return f"is {type(p).__name__} ({str(p)[:40]!r}), not text"


def _hub_dataset_exists(name: str, field_: str) -> None:
    """A name the hub says does not exist is refused at once (datasets would retry for half a minute first); an
    unreachable hub is left to load_dataset, which may find the dataset in its cache."""
    if _offline() or os.environ.get("HF_DATASETS_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        HfApi().dataset_info(name, timeout=10)
    except RepositoryNotFoundError:
        raise DatasetError(f"{field_} is invalid: no such file or folder here and no such dataset on the hub; check "
                           "the name, or log in if it is private (hf auth login)") from None
    except Exception:
        return


@contextlib.contextmanager
def _quiet_datasets():
    """While a local file is read: no progress bar (a file of prompts reads in milliseconds) and none of datasets'
    own log lines about it (a file it cannot parse is reported once, by the DatasetError that follows)."""
    from datasets.utils import logging as ds_logging

    bars, level = ds_logging.is_progress_bar_enabled(), ds_logging.get_verbosity()
    ds_logging.disable_progress_bar()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)
        if bars:
            ds_logging.enable_progress_bar()


def _load_dataset(args: TrainScriptArguments):
    from datasets import load_dataset

    name = args.dataset_name
    field_ = f"dataset_name={name!r}"
    ext = os.path.splitext(name)[1].lstrip(".").lower()
    if os.path.isfile(name):
        if ext not in DATA_EXTENSIONS:
            raise DatasetError(f"{field_} is invalid: a .{ext} file; give a .json, .jsonl, .csv or .parquet file, a "
                               "dataset folder, or a hub name")
        if os.path.getsize(name) == 0:
            raise DatasetError(f"{field_} is invalid: the file is empty (0 bytes); give a file with prompts")
        try:
            with _quiet_datasets():
                return load_dataset(DATA_EXTENSIONS[ext], data_files=name, split=args.dataset_train_split)
        except Exception as e:  # the user's file: whatever the reader says about it is the message
            cause = e.__cause__ or e
            raise DatasetError(f"{field_} is invalid: not readable as {ext} ({type(cause).__name__}: "
                               f"{one_line(cause)[:200] or 'no rows'}); fix the file") from e
    if os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_info.json")):
        from datasets import load_from_disk

        return load_from_disk(name)
    looks_local = ext in DATA_EXTENSIONS or name.startswith((".", "/", "~")) or name.count("/") > 1
    if not os.path.isdir(name) and looks_local:
        raise DatasetError(f"{field_} is invalid: no such file or folder; give a .json/.jsonl/.csv/.parquet file with "
                           f"a {args.prompt_column} column, a dataset folder, a hub name, or {TINY_PROMPTS}")
    _hub_dataset_exists(name, field_)
    try:
        return load_dataset(name, args.dataset_config, split=args.dataset_train_split)
    except Exception as e:
        if not _raised_in(e, ("datasets/", "huggingface_hub", "fsspec")):
            raise
        raise DatasetError(f"{field_} is invalid: {type(e).__name__}: {one_line(e)[:200]}; give a local file or "
                           "folder, or a hub dataset reachable from here") from e


# -- building and running -------------------------------------------------------------------------------------------

def given(argv: list[str] | None, name: str) -> bool:
    """Whether `name` was set by a flag (--name v, --name=v) or in the --config recipe."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == f"--{name}" or a.startswith(f"--{name}=") for a in argv):
        return True
    path, _ = _split_config(argv)
    return bool(path) and os.path.isfile(path) and name in load_recipe(path)


def build_trainer(argv: list[str] | None = None, parsed=None, trainer_class=None):
    """Parse a recipe plus flags (as the main job does) and build the trainer (`trainer_class`: a subclass of
    CorrectGRPOTrainer to build instead); nothing is trained yet. Every problem with what the user gave is a one-line
    errors.UserError raised before the engine is built."""
    script_args, args, model_args = parsed or parse(argv)
    cli_logging(args)  # the gate's phases and the engine build at INFO on rank 0 (--log_level warning hides them)
    model = check_model(model_args.model_name_or_path)
    rewards = [load_reward(r) for r in script_args.reward_funcs]
    dataset = load_prompts(script_args)
    try:
        peft_config = get_peft_config(model_args)
    except (ValueError, ImportError) as e:
        raise ConfigError(f"use_peft=True is invalid here: {one_line(e)}") from e
    from ..trainer import CorrectGRPOTrainer

    note_vllm_release()

    if model_args.use_peft and not given(argv, "lora_dropout") and model_args.lora_dropout:
        # TRL's ModelConfig defaults to 0.05, which makes the trainer's logprobs random draws once the adapter is
        # non-zero (gate cause `dropout`); a value the user sets is kept, and the gate names it
        logger.info("trl-correct: lora_dropout %g -> 0 (not set: TRL's default would make the trainer's logprobs "
                    "random draws)", model_args.lora_dropout)
        model_args.lora_dropout = 0.0
        peft_config = get_peft_config(model_args)

    init = dict(args.model_init_kwargs or {})
    if model_args.dtype is not None:
        init.setdefault("dtype", model_args.dtype)
    args.model_init_kwargs = init
    try:
        return (trainer_class or CorrectGRPOTrainer)(model=model, reward_funcs=rewards, args=args,
                                                     train_dataset=dataset, peft_config=peft_config)
    except UserError:
        raise
    except Exception as e:
        if _raised_in(e, ("adapters/engine.py", "vllm/")):
            raise  # the engine's build: not something the user gave (a traceback; --debug not needed)
        if isinstance(e, (OSError, ValueError, RuntimeError, KeyError)) and _raised_in(e, LOADING_MODULES) or \
                type(e).__name__ == "SafetensorError":
            raise ModelError(f"model_name_or_path={model_args.model_name_or_path!r} could not be loaded "
                             f"({type(e).__name__}: {one_line(e)[:240]}); check or re-save the model's files") from e
        if isinstance(e, ValueError) and (_raised_in(e, ("/trl/", "/transformers/"))
                                          or re.match(r"^\w+=.* is invalid: ", str(e))):
            raise ConfigError(one_line(e)) from e  # TRL's / our trainer's checks of the settings given
        raise


def _rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def run(argv: list[str] | None = None):
    """The main job; returns the trained trainer. Raises errors.UserError (one line) or core.checks.GateFailure."""
    parsed = parse(argv)
    script_args, args, _ = parsed
    cli_logging(args)  # before the lock and the resume: their notes (a lock taken over, checkpoints skipped) show
    lock = checkpoints.output_dir_lock(args.output_dir) if _rank0() else None
    if lock:
        lock.acquire()
    try:
        resume = checkpoints.resolve_resume(args.resume_from_checkpoint, args.output_dir)
        check_output_dir(args, script_args, resume)
        trainer = build_trainer(argv, parsed)
        trainer.train(resume_from_checkpoint=resume)
        trainer.save_model()  # the final model, with its certificate and model card, into output_dir
        return trainer
    finally:
        if lock:
            lock.release()


def main(argv: list[str] | None = None):
    """`python -m trl_correct.train` / `trl-correct train`: returns the trainer; on a user error prints one line and
    exits 2, on a gate failure prints the report and exits 1 (cli.guarded)."""
    from . import guarded

    done = []
    code = guarded("trl-correct train", lambda a: done.append(run(a)), list(sys.argv[1:] if argv is None else argv))
    if code:
        raise SystemExit(code)
    return done[0] if done else None


if __name__ == "__main__":
    main()
