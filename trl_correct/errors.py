"""Errors caused by what the user gave: one typed exception per kind, each carrying a one-line message that names the
field or file, what was found there, and the fix.

From Python they are raised like any exception (`UserError` is a `ValueError`, so code that caught the ValueErrors of
earlier releases keeps working). The command-line tools (cli/) print `str(error)` as one line on stderr and exit with
`EXIT_USER_ERROR` (2), without a traceback unless asked for one (`--debug`, or TRL_CORRECT_DEBUG=1). Anything else that
escapes is a bug and keeps its traceback. A gate failure is not a user error: it keeps its own exit code (1) and report.

Pure Python: nothing here imports torch, TRL or vLLM.
"""

import difflib

EXIT_USER_ERROR = 2  # argparse's own code for unusable arguments
EXIT_GATE_FAILED = 1  # an uncaught GateFailure has always ended the process with 1; kept


class UserError(ValueError):
    """Something the user gave (a path, a recipe, a field's value, a dataset, a model, a reward, a checkpoint, an
    output_dir) cannot be used. The message is one line: what, where, what was found, the fix."""

    def __init__(self, message: str):
        super().__init__(one_line(message))


class ConfigError(UserError):
    """A config field's value: type, range, choice, or a combination of fields."""


class RecipeError(UserError):
    """The recipe file or the command line: YAML syntax, not a mapping, an unknown field."""


class DatasetError(UserError):
    """The prompt dataset: not found, unreadable, missing its prompt column, empty, prompts that are not text."""


class ModelError(UserError):
    """model_name_or_path: not found, not resolvable offline, or not loadable as a causal LM."""


class RewardError(UserError):
    """A reward function: cannot be imported, or raised / returned a non-finite value while training."""


class CheckpointError(UserError):
    """resume_from_checkpoint: missing, partial (its save did not finish), or none to resume from."""


class OutputDirError(UserError):
    """output_dir: used by another running job (its lock), or holding a run that would be overwritten."""


def one_line(message: str) -> str:
    """`message` on one line: line breaks and runs of blanks become one space."""
    return " ".join(str(message).split())


def did_you_mean(word: str, choices) -> str:
    """' (did you mean X?)' for the closest of `choices` to `word`, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""
