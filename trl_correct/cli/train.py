"""The main job: GRPO with CorrectGRPOTrainer from a YAML recipe.

    accelerate launch --config_file accelerate_configs/cpu.yaml -m trl_correct.train --config recipes/tiny.yaml
    trl-correct train --config recipes/tiny.yaml [--field value ...]     # the same, flags override the recipe

`model_name_or_path` is a local HF model directory, a hub name (when the user has it), or `trl-correct/tiny` (the
embedded model, built and cached on first use). `dataset_name` is a local dataset (directory, or .json/.jsonl/.csv/
.parquet file with a `prompt` column), a hub name, or `trl-correct/tiny-prompts`. After training the model is saved
into `output_dir` with its parity certificate (correctness_certificate.json) and model card (README.md); `trl-correct
verify OUTPUT_DIR` re-checks it.
"""

import importlib
import logging
import os
import sys
from dataclasses import dataclass, field

from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from ..config import CorrectGRPOConfig
from ..console import cli_logging, note_vllm_release
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


# reward modules that moved with the package layout (recipes written before it keep working)
MOVED_MODULES = {"trl_correct.tiny": "trl_correct.tasks.tiny", "trl_correct.rewards": "trl_correct.tasks.rewards"}


def load_reward(path: str):
    module, _, name = path.rpartition(".")
    module = MOVED_MODULES.get(module, module)
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"reward_funcs: cannot import {path!r} ({e}); give module.function") from None


def load_prompts(args: TrainScriptArguments):
    if args.dataset_name == TINY_PROMPTS:
        return tiny_prompts()
    data = _load_dataset(args)
    if args.prompt_column not in data.column_names:
        raise ValueError(f"prompt_column={args.prompt_column!r} is invalid: {args.dataset_name} has columns "
                         f"{data.column_names}; name the one holding the prompt")
    if args.prompt_column != "prompt":
        data = data.rename_column(args.prompt_column, "prompt")
    if args.chat_prompts:
        system = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
        data = data.map(lambda row: {"prompt": system + [{"role": "user", "content": row["prompt"]}]})
    return data


def _load_dataset(args: TrainScriptArguments):
    from datasets import load_dataset

    name = args.dataset_name
    ext = os.path.splitext(name)[1].lstrip(".")
    if os.path.isfile(name):
        return load_dataset({"jsonl": "json"}.get(ext, ext), data_files=name, split=args.dataset_train_split)
    if os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_info.json")):
        from datasets import load_from_disk

        return load_from_disk(name)
    return load_dataset(name, args.dataset_config, split=args.dataset_train_split)


def resolve_model(name: str | None) -> str:
    if name in (None, TINY_MODEL):
        return str(tiny_model_dir())
    return name


def given(argv: list[str] | None, name: str) -> bool:
    """Whether `name` was set by a flag (--name v, --name=v) or in the --config recipe."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == f"--{name}" or a.startswith(f"--{name}=") for a in argv):
        return True
    for i, a in enumerate(argv):
        path = argv[i + 1] if a == "--config" and i + 1 < len(argv) else a.removeprefix("--config=")
        if (a == "--config" or a.startswith("--config=")) and os.path.isfile(path):
            import yaml

            with open(path) as f:
                recipe = yaml.safe_load(f)
            return isinstance(recipe, dict) and name in recipe
    return False


def build_trainer(argv: list[str] | None = None):
    """Parse a recipe plus flags (as the main job does) and build the trainer; nothing is trained yet."""
    parser = TrlParser((TrainScriptArguments, CorrectGRPOConfig, ModelConfig))
    script_args, args, model_args = parser.parse_args_and_config(args=argv)
    cli_logging(args)  # the gate's phases and the engine build at INFO on rank 0 (--log_level warning hides them)
    from ..trainer import CorrectGRPOTrainer

    note_vllm_release()

    if model_args.use_peft and not given(argv, "lora_dropout") and model_args.lora_dropout:
        # TRL's ModelConfig defaults to 0.05, which makes the trainer's logprobs random draws once the adapter is
        # non-zero (gate cause `dropout`); a value the user sets is kept, and the gate names it
        logger.info("trl-correct: lora_dropout %g -> 0 (not set: TRL's default would make the trainer's logprobs "
                    "random draws)", model_args.lora_dropout)
        model_args.lora_dropout = 0.0

    init = dict(args.model_init_kwargs or {})
    if model_args.dtype is not None:
        init.setdefault("dtype", model_args.dtype)
    args.model_init_kwargs = init
    return CorrectGRPOTrainer(model=resolve_model(model_args.model_name_or_path),
                              reward_funcs=[load_reward(r) for r in script_args.reward_funcs], args=args,
                              train_dataset=load_prompts(script_args), peft_config=get_peft_config(model_args))


def main(argv: list[str] | None = None):
    trainer = build_trainer(argv)
    resume = trainer.args.resume_from_checkpoint  # a checkpoint folder, or "true": the output_dir's last one
    trainer.train(resume_from_checkpoint=True if str(resume).lower() == "true" else resume)
    trainer.save_model()  # the final model, with its certificate and model card, into output_dir
    return trainer


if __name__ == "__main__":
    main()
