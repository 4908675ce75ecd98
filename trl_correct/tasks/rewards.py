"""Verifiable rewards for the real-model recipes (TRL reward-function signature: completions plus dataset columns as
keyword arguments, one float per completion)."""

import re

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _text(completion) -> str:
    """A completion as text: a string, or a conversational completion (list of messages)."""
    if isinstance(completion, str):
        return completion
    return " ".join(m.get("content", "") for m in completion if isinstance(m, dict))


def final_number(text: str) -> float | None:
    """The answer a text gives: the number after its last '####' if there is one (GSM8K's format), else its last
    number. None when it has none."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    found = NUMBER.findall(tail)
    if not found:
        return None
    try:
        return float(found[-1 if "####" not in text else 0].replace(",", ""))
    except ValueError:
        return None


def final_number_match(completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion's final number equals the reference answer's (column `answer`), else 0.0."""
    out = []
    for c, ref in zip(completions, answer):
        got, want = final_number(_text(c)), final_number(str(ref))
        out.append(float(got is not None and want is not None and abs(got - want) < 1e-6))
    return out
