"""What a run leaves for people: the correct/* metrics in the user's tracker (tensorboard here), and
`trl-correct plot RUN_DIR` drawing a real run's report."""

import json
from pathlib import Path

import pytest

from trl_correct.cli.plot import main as plot


def test_metrics_reach_tensorboard_and_the_plot_draws_the_run(make_trainer, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # a run whose engine is broken on purpose (observe: it trains on, uncorrected), so the plot has something to show
    trainer = make_trainer(max_steps=3, report_to="tensorboard", gate="observe", vllm_dtype="bfloat16")
    trainer.train()
    events = list(Path(trainer.args.output_dir).rglob("events.out.tfevents.*"))
    assert events, list(Path(trainer.args.output_dir).rglob("*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("train/correct/mean_abs_logprob_diff", "train/correct/tis_enabled", "train/correct/ratio/p99",
                "train/correct/ratio/seqs_outside_0.8_1.25"):
        assert tag in tags, tags
    gaps = [e.value for e in acc.Scalars("train/correct/mean_abs_logprob_diff")]
    assert len(gaps) == 3 and min(gaps) > 1e-4  # the bf16 engine's gap, logged every step

    out = tmp_path / "run.png"
    assert plot([trainer.args.output_dir, "--out", str(out)]) == 0
    assert out.stat().st_size > 30_000
    report = json.loads((Path(trainer.args.output_dir) / "correctness_report.json").read_text())
    assert not any(s["tis_enabled"] for s in report["steps"])  # what the plot shades


@pytest.mark.unit
def test_plot_of_a_directory_without_a_report_is_a_one_line_error(tmp_path, capsys):
    assert plot([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "correctness_report.json not found" in err and err.count("\n") == 1


def test_metrics_reach_trackio_offline(make_trainer, tmp_path):
    # trackio keeps runs in a local SQLite file (no Space, no network); TRL's profiling would log to it before its
    # run exists (TRL 1.16 raises then), so the gate runs with the trackers quiet
    import sqlite3

    from trackio.utils import TRACKIO_DIR  # fixed when trackio is first imported (TRACKIO_DIR env, else the HF cache)

    project = f"trl-correct-test-{tmp_path.name}"
    trainer = make_trainer(max_steps=2, report_to="trackio", project=project)
    trainer.train()
    assert trainer.args.report_to == ["trackio"]  # the user's setting, back after the gate
    path = Path(TRACKIO_DIR) / f"{project}.db"
    db = sqlite3.connect(path)
    logged = [json.loads(m) for (m,) in db.execute("select metrics from metrics")]
    db.close()
    for leftover in Path(TRACKIO_DIR).glob(f"{project}.*"):
        leftover.unlink()
    gaps = [m["train/correct/max_abs_logprob_diff"] for m in logged if "train/correct/max_abs_logprob_diff" in m]
    assert len(gaps) == 2 and max(gaps) < 1e-4, gaps
    assert any("train/correct/ratio/masked_frac" in m for m in logged)
