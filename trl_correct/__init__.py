"""trl-correct: GRPO with colocated vLLM whose trainer/engine parity is proven before any correction is applied."""

from .config import CorrectGRPOConfig
from .core.checks import Check, GateFailure, GateReport

__all__ = ["CorrectGRPOConfig", "CorrectGRPOTrainer", "Check", "GateFailure", "GateReport"]


def __getattr__(name):  # the trainer imports vLLM: load it only when asked for
    if name == "CorrectGRPOTrainer":
        from .trainer import CorrectGRPOTrainer

        return CorrectGRPOTrainer
    raise AttributeError(name)
