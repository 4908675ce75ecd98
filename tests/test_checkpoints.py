"""A checkpoint is whole or ignored; one run per output_dir (issue 29; trl_correct/checkpoints.py).

Unit (fabricated folders, no engine): what makes a folder a whole checkpoint (the completion marker, every file it
lists at its size; a stock TRL checkpoint by its trainer_state.json), the latest whole one found past partial ones,
a partial one given by path refused by name, the lock's re-entry.

On the real engine (two processes, one engine each, one after the other): the main job killed with SIGKILL in the
middle of writing checkpoint-4 (tests/_kill_during_save.py pauses it after the weights and the optimizer, before
trainer_state.json and the marker), then `--resume_from_checkpoint true`: it skips the partial checkpoint-4 by name,
takes over the dead run's lock, resumes from checkpoint-2 with the gate re-run, finishes, and the final certificate
records the resume and the changed sampler setting. Not run here (an engine each): kill -9 during generation, the
optimizer step or the gate (none leaves a folder that looks like a checkpoint: they resume from the last whole one
like this test does), SIGTERM, a full disk (a failed write leaves a folder without the marker, as here).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trl_correct import checkpoints
from trl_correct.checkpoints import COMPLETE_FILE, OutputDirLock, latest_complete, resolve_resume, why_partial
from trl_correct.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


def fake_checkpoint(out: Path, step: int, whole: bool = True, ours: bool = True) -> Path:
    ck = out / f"checkpoint-{step}"
    ck.mkdir(parents=True)
    (ck / "model.safetensors").write_bytes(b"w" * 64)
    (ck / "optimizer.pt").write_bytes(b"o" * 32)
    (ck / "trainer_state.json").write_text("{}")
    if ours:
        (ck / "correctness_certificate.json").write_text("{}")
        (ck / "correctness_state.json").write_text("{}")
        if whole:
            checkpoints.mark_complete(str(ck), step)
    return ck


@pytest.mark.unit
def test_whole_only_with_the_marker_and_every_file_at_its_size(tmp_path):
    ck = fake_checkpoint(tmp_path, 2)
    assert why_partial(str(ck)) is None
    listed = json.loads((ck / COMPLETE_FILE).read_text())["files"]
    assert set(listed) == {"model.safetensors", "optimizer.pt", "trainer_state.json", "correctness_certificate.json",
                           "correctness_state.json"}
    (ck / "optimizer.pt").write_bytes(b"o" * 7)  # a torn write, or a file changed since
    assert why_partial(str(ck)) == "optimizer.pt has 7 bytes, 32 when the checkpoint was written"
    (ck / "optimizer.pt").unlink()
    assert why_partial(str(ck)) == f"optimizer.pt is missing (listed in {COMPLETE_FILE})"
    unfinished = fake_checkpoint(tmp_path, 4, whole=False)
    assert why_partial(str(unfinished)).startswith(f"no {COMPLETE_FILE}: its save did not finish")
    stock = fake_checkpoint(tmp_path, 6, ours=False)  # stock TRL: no marker to look for; its last file is there
    assert why_partial(str(stock)) is None
    (stock / "trainer_state.json").unlink()
    assert why_partial(str(stock)).startswith("no trainer_state.json")


@pytest.mark.unit
def test_latest_whole_checkpoint_skips_partial_ones_by_name(tmp_path, caplog):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 4)
    fake_checkpoint(tmp_path, 6, whole=False)
    fake_checkpoint(tmp_path, 10, whole=False)
    path, skipped = latest_complete(str(tmp_path))
    assert path == str(tmp_path / "checkpoint-4")
    assert [os.path.basename(p) for p, _ in skipped] == ["checkpoint-10", "checkpoint-6"]  # by step, not by name
    with caplog.at_level("WARNING", logger="trl_correct"):
        assert resolve_resume(True, str(tmp_path)) == str(tmp_path / "checkpoint-4")
        assert resolve_resume("true", str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert "skipped checkpoint-10 (partial: no checkpoint_complete.json" in caplog.text
    assert "checkpoint-6 (partial" in caplog.text
    assert resolve_resume(None, str(tmp_path)) is None and resolve_resume("false", str(tmp_path)) is None


@pytest.mark.unit
def test_partial_checkpoint_by_path_is_refused_by_name(tmp_path):
    fake_checkpoint(tmp_path, 2)
    partial = fake_checkpoint(tmp_path, 4, whole=False)
    with pytest.raises(CheckpointError) as e:
        resolve_resume(str(partial), str(tmp_path))
    msg = str(e.value)
    assert msg.startswith(f"resume_from_checkpoint={str(partial)!r} is invalid: a partial checkpoint (no "
                          f"{COMPLETE_FILE}") and f"resume from {tmp_path / 'checkpoint-2'}" in msg and "\n" not in msg
    fake_checkpoint(tmp_path / "only-partial", 1, whole=False)
    with pytest.raises(CheckpointError, match="no whole checkpoint in .*checkpoint-1 is partial"):
        resolve_resume(True, str(tmp_path / "only-partial"))
    with pytest.raises(CheckpointError, match=r"^resume_from_checkpoint=True is invalid: no checkpoint in "):
        resolve_resume(True, str(tmp_path / "empty"))


@pytest.mark.unit
def test_lock_is_reentrant_in_one_process_and_leaves_no_empty_dir(tmp_path):
    out = tmp_path / "new-run"
    outer = OutputDirLock(str(out)).acquire()
    with OutputDirLock(str(out)):  # trainer.train inside the CLI's run
        pass
    assert (out / checkpoints.LOCK_FILE).exists()  # still held by the outer
    outer.release()
    assert not out.exists()  # created for the lock, nothing written: removed again


# -- on the real engine: kill -9 in the middle of a checkpoint write, then resume the latest -------------------------

RUN = ["--config", "recipes/tiny.yaml", "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2",
       "--per_device_train_batch_size", "8", "--max_completion_length", "12", "--probe_size", "4", "--probe_tokens",
       "8", "--logging_steps", "1", "--disable_tqdm", "true"]


def _launch(argv, out: Path, name: str, env: dict) -> subprocess.Popen:
    log = open(out.parent / f"{name}.log", "w")
    return subprocess.Popen([sys.executable, "tests/_kill_during_save.py", "train", *argv], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, **env}, start_new_session=True)


def _stopped_at(argv, out: Path, env: dict, where: str, sig=signal.SIGKILL, wait_s: int = 120) -> subprocess.Popen:
    """A run launched through the helper, stopped with `sig` once it has paused at its point (`where`, for the
    message when it never gets there); its log is <out's parent>/first.log."""
    paused = Path(env["KILL_POINT_FILE"])
    first = _launch(argv, out, "first", env)
    deadline = time.time() + 900
    while not paused.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    log = (out.parent / "first.log").read_text()
    assert paused.exists(), f"the run never reached {where} (rc {first.poll()}):\n{log[-3000:]}"
    os.killpg(first.pid, sig)  # its own session: the run and anything it started
    first.wait(timeout=wait_s)
    return first


def test_kill_during_checkpoint_write_then_resume_latest(tmp_path):
    out, paused = tmp_path / "run", tmp_path / "paused"
    first = _stopped_at([*RUN, "--output_dir", str(out)], out, {"KILL_POINT_STEP": "4", "KILL_POINT_FILE": str(paused)},
                        "the checkpoint write", wait_s=60)
    ck2, ck4 = out / "checkpoint-2", out / "checkpoint-4"
    assert paused.read_text() == str(ck4)
    assert why_partial(str(ck2)) is None
    assert (ck4 / "optimizer.pt").exists() and (ck4 / "correctness_certificate.json").exists()  # looks like one...
    assert why_partial(str(ck4)).startswith(f"no {COMPLETE_FILE}")  # ...and is not
    assert json.loads((out / checkpoints.LOCK_FILE).read_text())["pid"] == first.pid  # left by the killed run

    second = subprocess.run([sys.executable, "-m", "trl_correct.train", *RUN, "--output_dir", str(out),
                             "--resume_from_checkpoint", "true", "--temperature", "0.8"],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-4000:]
    err = second.stderr
    assert f"took over the lock left by pid {first.pid}" in err
    assert f"resuming from {ck2}, the latest whole checkpoint; skipped checkpoint-4 (partial: no {COMPLETE_FILE}" \
        in err
    assert "with changed settings (trainer sampler" in err
    assert why_partial(str(ck4)) is None  # written again, whole this time
    assert not (out / checkpoints.LOCK_FILE).exists()
    cert = json.loads((out / "correctness_certificate.json").read_text())
    assert cert["verdict"] == "pass" and cert["gate"]["verdict"] == "pass"
    (resume,) = cert["run"]["resumes"]
    assert resume["from"] == str(ck2) and resume["step"] == 2 and resume["saved_gate"] == "pass"
    changed = resume["changed"]["trainer sampler"]
    assert changed["saved"]["temperature"] == 0.9 and changed["now"]["temperature"] == 0.8
    state = json.loads((ck4 / "correctness_state.json").read_text())
    assert [r["step"] for r in state["steps"]] == [0, 1, 2, 3] and state["resumes"][0]["changed"]


INTERRUPTIONS = {  # point, signal: a run stopped there, and what the next run must do
    "kill -9 during generation": ("generate", signal.SIGKILL),
    "kill -9 during the optimizer step": ("optimizer", signal.SIGKILL),
    "SIGTERM during generation": ("generate", signal.SIGTERM),
}


@pytest.mark.parametrize("case", list(INTERRUPTIONS))
def test_interrupted_run_resumes_from_the_last_whole_checkpoint(tmp_path, case):
    """Stopped after checkpoint-2 was written whole, in the middle of the next step: `--resume_from_checkpoint true`
    resumes from checkpoint-2 (the lock left behind taken over), the gate re-runs and passes, and the run finishes
    with a certificate recording the resume."""
    point, sig = INTERRUPTIONS[case]
    out, paused = tmp_path / "run", tmp_path / "paused"
    ck2 = out / "checkpoint-2"
    first = _stopped_at([*RUN, "--output_dir", str(out)], out, {
        "KILL_POINT": point, "KILL_POINT_AFTER": str(ck2 / COMPLETE_FILE), "KILL_POINT_FILE": str(paused)}, point, sig)
    assert why_partial(str(ck2)) is None and not (out / "checkpoint-4").exists()

    second = subprocess.run([sys.executable, "-m", "trl_correct.train", *RUN, "--output_dir", str(out),
                             "--resume_from_checkpoint", "true"], cwd=ROOT, capture_output=True, text=True,
                            timeout=900)
    assert second.returncode == 0, second.stderr[-4000:]
    assert f"took over the lock left by pid {first.pid}" in second.stderr
    cert = json.loads((out / "correctness_certificate.json").read_text())
    assert cert["verdict"] == "pass" and [r["from"] for r in cert["run"]["resumes"]] == [str(ck2)]


def test_run_killed_in_the_gate_leaves_nothing_in_the_way(tmp_path):
    """Killed in the gate before step 0 (nothing saved yet): the same command runs again, taking over the lock."""
    out, paused = tmp_path / "run", tmp_path / "paused"
    first = _stopped_at([*RUN, "--output_dir", str(out), "--overwrite_output_dir", "false"], out,
                        {"KILL_POINT": "gate", "KILL_POINT_FILE": str(paused)}, "the gate")
    second = subprocess.run([sys.executable, "-m", "trl_correct.train", *RUN, "--output_dir", str(out),
                             "--overwrite_output_dir", "false", "--max_steps", "1"], cwd=ROOT, capture_output=True,
                            text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-4000:]
    assert f"took over the lock left by pid {first.pid}" in second.stderr
