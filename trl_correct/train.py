"""Launch entry point of the main job, kept at this path so `accelerate launch -m trl_correct.train` and existing
scripts keep working; the command-line tool itself is `trl_correct.cli.train`."""

from .cli.train import TrainScriptArguments, build_trainer, given, load_prompts, load_reward, main  # noqa: F401

if __name__ == "__main__":
    main()
