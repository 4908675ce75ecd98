"""trl-correct: GRPO with colocated vLLM whose trainer/engine parity is proven before any correction is applied."""

from .console import note_vllm_release, quiet_dependencies

quiet_dependencies()  # before TRL/vLLM are imported: known-harmless messages, each by its text (docs/CONSOLE.md)

from .config import CorrectGRPOConfig  # noqa: E402
from .core.checks import Check, GateFailure, GateReport  # noqa: E402
from .errors import UserError  # noqa: E402,F401 (what the user gave is unusable: one line; errors.py)

__all__ = ["CorrectGRPOConfig", "CorrectGRPOTrainer", "Check", "GateFailure", "GateReport"]


def __getattr__(name):  # the trainer imports vLLM: load it only when asked for
    if name == "CorrectGRPOTrainer":
        from .trainer import CorrectGRPOTrainer

        note_vllm_release()  # once: in place of TRL's vLLM-range warning
        return CorrectGRPOTrainer
    raise AttributeError(name)
