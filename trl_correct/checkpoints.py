"""Checkpoints that are whole or ignored, and one run per output_dir.

A checkpoint folder (`checkpoint-N`) is written in pieces, in this order: transformers' `_save_checkpoint` writes the
model through `save_model` (weights, config, tokenizer, and trl-correct's certificate and model card), the optimizer,
scheduler and RNG state, then `trainer_state.json`; trl-correct's override then adds `correctness_state.json` (the
gate's history) and, last of all, once every rank has finished writing, `COMPLETE_FILE`: every file of the folder with
its size. A kill -9, a full disk or any error in between leaves a folder without it.

- `why_partial(folder)`: None for a whole checkpoint (the marker is there and every file it lists has its size), else
  why not, in words. A checkpoint written by stock TRL / transformers (no certificate, no gate state) cannot carry the
  marker; it counts when transformers' last file, trainer_state.json, is there (as before trl-correct marked them).
- `resolve_resume(value, output_dir)`: what `resume_from_checkpoint` (a path, or true / "true": the latest) resumes
  from; a partial checkpoint given by path is refused by name (errors.CheckpointError), "the latest" is the latest
  whole one, and the partial ones skipped are named in a warning.
- `settings_changes(checkpoint, trainer)`: the settings that decide what the gate compares (each side's dtype and head
  dtype, the sampler, the engine's logprobs mode, the model) that differ from the checkpoint's certificate.
- `OutputDirLock` / `output_dir_lock(dir)`: `<output_dir>/.trl-correct.lock`, an exclusive flock held for the run,
  the file holding the holder's pid, host and start. A second run on the same output_dir is refused in one line
  (errors.OutputDirError) naming the holder. The kernel drops a flock when its process dies (kill -9 included), so a
  lock file left by a dead run is taken over, with a note naming the run that left it. Re-entrant within a process
  (the CLI holds it across train and save_model; trainer.train takes it too).

Knows the file names transformers and trl-correct write into a checkpoint; nothing of vLLM.
"""

import errno
import fcntl
import json
import logging
import os
import re
import socket
import sys
from contextlib import contextmanager
from datetime import datetime, timezone

from .errors import CheckpointError, OutputDirError

logger = logging.getLogger("trl_correct")

COMPLETE_FILE = "checkpoint_complete.json"  # written last: the folder is a whole checkpoint
STATE_FILE = "correctness_state.json"  # the gate's state inside each checkpoint folder (trainer.py writes it)
CERTIFICATE_FILE = "correctness_certificate.json"  # certificate.CERTIFICATE_FILE (not imported: this module is light)
TRAINER_STATE = "trainer_state.json"  # transformers' TRAINER_STATE_NAME: the last file its _save_checkpoint writes
LOCK_FILE = ".trl-correct.lock"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR-<step>


# -- whole or partial -------------------------------------------------------------------------------------------------

def _files(folder: str) -> dict[str, int]:
    """{path relative to folder: size} of every file under it (the marker excluded)."""
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(root, n)
            rel = os.path.relpath(p, folder)
            if rel != COMPLETE_FILE and not rel.startswith(COMPLETE_FILE + ".") and os.path.isfile(p):
                out[rel] = os.path.getsize(p)
    return out


def mark_complete(folder: str, step: int) -> str:
    """Write `folder`/COMPLETE_FILE (atomically: a temporary file renamed over it), listing every file and its size.
    Call it last, after every rank has written its part. Returns the marker's path."""
    path = os.path.join(folder, COMPLETE_FILE)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"step": step, "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "files": _files(folder)}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str, obj, **kw) -> None:
    """json.dump into `path` through a temporary file renamed over it: the file is whole or absent."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, **kw)
    os.replace(tmp, path)


def is_foreign(folder: str) -> bool:
    """A checkpoint not written by trl-correct (stock TRL / transformers): no certificate, no gate state."""
    return not any(os.path.exists(os.path.join(folder, n)) for n in (CERTIFICATE_FILE, STATE_FILE, COMPLETE_FILE))


def why_partial(folder: str) -> str | None:
    """None when `folder` is a whole checkpoint; else why it is not (a phrase: 'no checkpoint_complete.json: ...')."""
    if not os.path.isdir(folder):
        return "not a folder"
    marker = os.path.join(folder, COMPLETE_FILE)
    if is_foreign(folder):  # stock TRL / transformers: its own last file is all there is to go by
        return None if os.path.isfile(os.path.join(folder, TRAINER_STATE)) else \
            f"no {TRAINER_STATE} (transformers writes it last: the save did not finish)"
    if not os.path.isfile(marker):
        return f"no {COMPLETE_FILE}: its save did not finish (interrupted, or a write failed)"
    try:
        with open(marker) as f:
            listed = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{COMPLETE_FILE} is unreadable ({type(e).__name__})"
    for rel, size in listed.items():
        p = os.path.join(folder, rel)
        if not os.path.isfile(p):
            return f"{rel} is missing (listed in {COMPLETE_FILE})"
        if os.path.getsize(p) != size:
            return f"{rel} has {os.path.getsize(p)} bytes, {size} when the checkpoint was written"
    return None


def checkpoints_in(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint-N folder in `output_dir`, latest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, n)) for n in os.listdir(output_dir)
             if (m := CHECKPOINT_RE.match(n)) and os.path.isdir(os.path.join(output_dir, n))]
    return sorted(found, reverse=True)


def latest_complete(output_dir: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(the latest whole checkpoint in `output_dir` or None, [(partial checkpoint newer than it, why)])."""
    skipped = []
    for _, path in checkpoints_in(output_dir):
        why = why_partial(path)
        if why is None:
            return path, skipped
        skipped.append((path, why))
    return None, skipped


def _names(found) -> str:
    return ", ".join(os.path.basename(p) for p in found)


def resolve_resume(value, output_dir: str) -> str | None:
    """The checkpoint folder `resume_from_checkpoint=value` resumes from (None: a fresh start). `value`: None / False /
    "" (fresh), True / "true" (the latest whole checkpoint in `output_dir`; partial ones newer than it are named in a
    warning), or a folder (refused by name when partial). Raises errors.CheckpointError."""
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in ("", "false", "none")):
        return None
    if value is True or (isinstance(value, str) and value.strip().lower() == "true"):
        path, skipped = latest_complete(output_dir)
        if path is None and not skipped:
            raise CheckpointError(f"resume_from_checkpoint=True is invalid: no checkpoint in {output_dir}; give a "
                                  "checkpoint folder, or start without resume_from_checkpoint")
        if path is None:
            raise CheckpointError(
                f"resume_from_checkpoint=True is invalid: no whole checkpoint in {output_dir} ("
                + "; ".join(f"{os.path.basename(p)} is partial: {why}" for p, why in skipped)
                + "); start without resume_from_checkpoint, or give another run's checkpoint folder")
        if skipped:
            logger.warning("trl-correct: resuming from %s, the latest whole checkpoint; skipped %s", path,
                           "; ".join(f"{os.path.basename(p)} (partial: {why})" for p, why in skipped))
        return path
    path = str(value)
    if not os.path.isdir(path):
        there = checkpoints_in(os.path.dirname(os.path.normpath(path)) or ".") or checkpoints_in(output_dir)
        hint = f" ({_names(p for _, p in there[:4])} exist there)" if there else ""
        raise CheckpointError(f"resume_from_checkpoint={path!r} is invalid: no such folder{hint}; give a checkpoint "
                              "folder, or true for the latest whole one in output_dir")
    why = why_partial(path)
    if why is not None:
        whole, _ = latest_complete(os.path.dirname(os.path.normpath(path)) or ".")
        fix = (f"resume from {whole} (the latest whole checkpoint there) or with true" if whole
               else "no whole checkpoint is next to it: start without resume_from_checkpoint")
        raise CheckpointError(f"resume_from_checkpoint={path!r} is invalid: a partial checkpoint ({why}); {fix}")
    return path


# -- what a resume changes ------------------------------------------------------------------------------------------

# (side, fact) that decide what the gate compares: each side's dtype and head dtype, the sampler, the engine's
# logprobs semantics, and the model (under PEFT: the base the adapter sits on)
GATED_SETTINGS = (("trainer", "compute_dtype"), ("trainer", "head_dtype"), ("trainer", "sampler"),
                  ("engine", "compute_dtype"), ("engine", "head_dtype"), ("engine", "logprobs_mode"),
                  ("model", "name_or_path"))


def _without_order(v):
    return {k: x for k, x in v.items() if k != "order"} if isinstance(v, dict) else v


def load_weights(trainer, checkpoint: str, load) -> None:
    """`load(trainer, checkpoint)` (transformers' checkpoint loading, through adapters/trl_api.py); weights that do not
    load into this model are a CheckpointError naming the checkpoint and the fix."""
    try:
        load(trainer, checkpoint)
    except (RuntimeError, ValueError, OSError) as e:
        raise CheckpointError(f"resume_from_checkpoint={checkpoint!r} is invalid: its weights do not load into "
                              f"this model ({str(e).strip().splitlines()[0][:200]}); resume with the "
                              "model_name_or_path it was trained from") from e


def read_state(checkpoint: str) -> dict:
    """The gate state saved in `checkpoint` (STATE_FILE: step, verdict, TIS state, steps, failures, resumes); {} with
    a warning when the checkpoint was not saved by trl-correct."""
    path = os.path.join(checkpoint, STATE_FILE)
    if not os.path.exists(path):
        logger.warning("trl-correct: %s has no %s (not saved by trl-correct): gate history starts empty",
                       checkpoint, STATE_FILE)
        return {}
    with open(path) as f:
        return json.load(f)


def settings_changes(checkpoint: str, trainer) -> dict:
    """{"<side> <fact>": {"saved": ..., "now": ...}} for each GATED_SETTINGS entry that differs between the
    checkpoint's certificate and `trainer` (its engine built). {} when they agree or the checkpoint has no certificate.

    Re-gated and recorded, not refused: the gate that runs before the first resumed step compares trainer and engine
    as they are now, both built from the current config, exactly as before a fresh run, and TIS comes back on only if
    it passes; the steps before the resume were gated under their own settings and keep their records. Refusing
    would block resumes the gate asks for (a bf16 head after a failed `lm_head_dtype` check, another sampler). What
    a reader of the certificate must know is that the run's steps mix settings: the trainer records these changes in
    the resume entry (`changed`) of its report, checkpoints and certificate, and warns."""
    from . import certificate

    cert = certificate.load(checkpoint)
    if not cert or "settings" not in cert:
        return {}
    saved = {"trainer": cert["settings"].get("trainer", {}), "engine": cert["settings"].get("engine", {}),
             "model": cert.get("model") or {}}
    now = {"trainer": certificate.facts_dict(trainer.trainer_facts()),
           "engine": certificate.facts_dict(trainer.engine.facts()), "model": certificate.model_info(trainer)}
    changes = {}
    for side, key in GATED_SETTINGS:
        a, b = _without_order(saved[side].get(key)), _without_order(now[side].get(key))
        if key in saved[side] and a != b:
            changes[f"{side} {key}"] = {"saved": a, "now": b}
    if changes:
        logger.warning("trl-correct: resuming %s with changed settings (%s): the gate re-runs under the new ones; the "
                       "certificate records the change", checkpoint,
                       "; ".join(f"{k} {v['saved']} -> {v['now']}" for k, v in changes.items()))
    return changes


# -- one run per output_dir ---------------------------------------------------------------------------------------

_held: dict[str, list] = {}  # realpath of the lock file -> [fd, depth, whether acquire created output_dir]


def _holder(path: str) -> dict:
    try:
        with open(path) as f:
            return json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(h: dict) -> str:
    bits = [f"pid {h['pid']}" if h.get("pid") else "", f"on {h['host']}" if h.get("host") else "",
            f"since {h['started']}" if h.get("started") else ""]
    return " ".join(b for b in bits if b) or "a run that left no details"


class OutputDirLock:
    """The exclusive lock on `output_dir` for one run (see the module docstring). `acquire()` raises
    errors.OutputDirError when another live process holds it; `release()` removes the lock file."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_FILE)

    def acquire(self) -> "OutputDirLock":
        key = os.path.realpath(self.path)
        if key in _held:
            _held[key][1] += 1
            return self
        created = not os.path.isdir(self.output_dir)
        os.makedirs(self.output_dir, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                if created:
                    self._remove_dir_if_empty()
                raise OutputDirError(
                    f"output_dir {self.output_dir} is in use by another run ({_describe(_holder(self.path))}; lock "
                    f"{self.path}); wait for it to end, or give this run another output_dir") from None
            try:  # the file may have been removed (a run releasing it) between open and flock: lock the new one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        left = _holder(self.path)
        if left.get("pid"):
            logger.warning("trl-correct: %s: took over the lock left by %s (that run ended without releasing it, "
                           "e.g. killed)", self.output_dir, _describe(left))
        mine = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv[:1]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(mine).encode(), 0)
        _held[key] = [fd, 1, created]
        return self

    def release(self) -> None:
        key = os.path.realpath(self.path)
        if key not in _held:
            return
        _held[key][1] -= 1
        if _held[key][1] > 0:
            return
        fd, _, created = _held.pop(key)
        try:
            os.unlink(self.path)  # before unlocking: a waiter then re-opens and locks a new file
        except FileNotFoundError:
            pass
        os.close(fd)
        if created:  # a run refused before writing anything leaves no empty output_dir behind
            self._remove_dir_if_empty()

    def _remove_dir_if_empty(self) -> None:
        try:
            os.rmdir(self.output_dir)
        except OSError:
            pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


@contextmanager
def run_lock(output_dir: str, main_process: bool = True):
    """The output_dir lock held for the body, by the main process (the other ranks write no checkpoint of their
    own)."""
    lock = output_dir_lock(output_dir) if main_process else None
    if lock:
        lock.acquire()
    try:
        yield lock
    finally:
        if lock:
            lock.release()


def output_dir_lock(output_dir: str) -> OutputDirLock:
    return OutputDirLock(output_dir)
