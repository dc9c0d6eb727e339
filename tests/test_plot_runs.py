"""tools/plot_runs.py: curves from metrics.jsonl, the summary table, located errors."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import plot_runs  # noqa: E402


def write_run(directory: Path, val_losses: list[float], tokens_per_iter: int = 1024) -> Path:
    directory.mkdir(parents=True)
    lines = []
    for i, loss in enumerate(val_losses, 1):
        it = 10 * i
        lines.append({"iteration": it, "consumed_tokens": it * tokens_per_iter, "lm_loss": loss + 0.1, "lr": 1e-3, "grad_norm": 1.0})
        lines.append({"iteration": it, "consumed_tokens": it * tokens_per_iter, "val_loss": loss, "val_ppl": math.exp(loss)})
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return directory


def test_plot_and_summary(tmp_path, capsys):
    a = write_run(tmp_path / "baseline", [5.0, 4.0, 3.5])
    b = write_run(tmp_path / "all", [5.0, 3.8, 3.9])
    out = tmp_path / "plots" / "conv.png"
    assert plot_runs.main([str(a), str(b), "--output", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.parent.glob(".*tmp*"))
    table = capsys.readouterr().out
    assert "| baseline | 3.5000 | 33.12 | 3.5000 | 30720 |" in table
    assert "| all | 3.9000 | 49.40 | 3.8000 | 20480 |" in table


def test_x_axis_is_tokens_when_logged(tmp_path):
    run = plot_runs.load_run(str(write_run(tmp_path / "r", [4.0, 3.0], tokens_per_iter=7)), "r")
    assert run.x_label == "tokens" and run.val == [(70.0, 4.0), (140.0, 3.0)]
    assert run.train == [(70.0, 4.1), (140.0, 3.1)]


def test_event_records_are_not_curve_points(tmp_path):
    run = write_run(tmp_path / "r", [4.0, 3.0])
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps({"iteration": 25, "event": "loss_spike", "lm_loss": 9.0, "running_mean": 4.0}) + "\n")
    curves = plot_runs.load_run(str(run), "r")
    assert curves.x_label == "tokens" and 9.0 not in [loss for _, loss in curves.train]


def test_malformed_line_is_located(tmp_path, capsys):
    run = write_run(tmp_path / "r", [4.0])
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write("{not json\n")
    out = tmp_path / "x.png"
    assert plot_runs.main([str(run), "--output", str(out)]) == 1
    assert f"{run / 'metrics.jsonl'}:3: not JSON" in capsys.readouterr().err
    assert not out.exists()


def test_missing_run_and_label_count(tmp_path, capsys):
    assert plot_runs.main([str(tmp_path / "nope"), "--output", str(tmp_path / "x.png")]) == 1
    assert "no such metrics file" in capsys.readouterr().err
    run = write_run(tmp_path / "r", [4.0])
    with pytest.raises(SystemExit):
        plot_runs.main([str(run), "--labels", "a", "b", "--output", str(tmp_path / "x.png")])
