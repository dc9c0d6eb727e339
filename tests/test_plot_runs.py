"""tools/plot_runs.py: curves from metrics.jsonl, resumed runs, empty panels, the summary table, located errors."""

from __future__ import annotations

import json
import math
import sys
import warnings
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
    assert plot_runs.main([str(run), "--output", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {run / 'metrics.jsonl'}:3: not JSON")
    assert not out.exists()


def test_iteration_must_be_an_integer(tmp_path, capsys):
    run = write_run(tmp_path / "r", [4.0])
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps({"iteration": "30", "lm_loss": 3.0}) + "\n")
    assert plot_runs.main([str(run), "--output", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err == (f"error: {run / 'metrics.jsonl'}:3: expected a JSON object with an integer "
                                       "'iteration' field\n")


def test_user_input_errors_exit_2_as_argparse_does(tmp_path, capsys):
    assert plot_runs.main([str(tmp_path / "nope"), "--output", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'nope'}: no such metrics file")
    run = write_run(tmp_path / "r", [4.0])
    with pytest.raises(SystemExit) as argparse_exit:
        plot_runs.main([str(run), "--labels", "a", "b", "--output", str(tmp_path / "x.png")])
    assert argparse_exit.value.code == 2 and "error: --labels has 2 entries for 1 runs" in capsys.readouterr().err
    untimed = tmp_path / "untimed" / "metrics.jsonl"
    untimed.parent.mkdir()
    untimed.write_text(json.dumps({"iteration": 10, "lm_loss": 4.0}) + "\n")
    assert plot_runs.main([str(run), str(untimed.parent), "--output", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.startswith("error: some runs logged consumed tokens and some did not")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert plot_runs.main([str(run), "--output", str(blocker / "x.png")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --output {blocker / 'x.png'}: cannot write the PNG: ")


def write_records(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_a_resumed_run_keeps_its_records_in_iteration_order(tmp_path, capsys):
    """Checkpoint at 10; the first run logged to 20 and evaluated at 10 and 20; the resumed
    run logs 15 and 20 again and evaluates at 20 (and with a null loss at 25)."""
    train = lambda it, loss: {"iteration": it, "lm_loss": loss}  # noqa: E731
    val = lambda it, loss: {"iteration": it, "val_loss": loss}  # noqa: E731
    first = [train(5, 6.0), train(10, 5.0), val(10, 5.5), train(15, 1.0), train(20, 1.0), val(20, 1.0)]
    resumed = [train(15, 4.5), train(20, 4.0), val(20, 4.2), train(25, 3.9), val(25, None)]
    path = write_records(tmp_path / "r" / "metrics.jsonl", first + resumed)
    run = plot_runs.load_run(str(path), "r")
    assert run.x_label == "iteration"
    assert run.train == [(5.0, 6.0), (10.0, 5.0), (15.0, 4.5), (20.0, 4.0), (25.0, 3.9)]
    assert run.val == [(10.0, 5.5), (20.0, 4.2)]
    assert plot_runs.main([str(path.parent), "--output", str(tmp_path / "x.png")]) == 0
    assert "| r | 4.2000 | 66.69 | 4.2000 | 20 |" in capsys.readouterr().out


def test_records_of_the_abandoned_run_past_the_resumed_ones_are_dropped(tmp_path):
    """The resumed run (from iteration 10) stopped at 15: the first run's 20 is not its history."""
    records = [{"iteration": 10, "lm_loss": 5.0}, {"iteration": 20, "lm_loss": 1.0}, {"iteration": 20, "val_loss": 1.0},
               {"iteration": 15, "lm_loss": 4.5}]
    run = plot_runs.load_run(str(write_records(tmp_path / "metrics.jsonl", records)), "r")
    assert (run.train, run.val) == ([(10.0, 5.0), (15.0, 4.5)], [])


def test_a_panel_without_records_says_so_without_a_warning(tmp_path, monkeypatch, capsys):
    import matplotlib.pyplot as plt

    path = write_records(tmp_path / "r" / "metrics.jsonl", [{"iteration": 10, "consumed_tokens": 80, "lm_loss": 4.0}])
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to look at it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plot_runs.main([str(path.parent), "--output", str(tmp_path / "x.png")]) == 0
    val_ax, train_ax = figures[0].axes
    assert [text.get_text() for text in val_ax.texts] == ["no validation loss records"] and not val_ax.lines
    assert val_ax.get_legend() is None and train_ax.get_legend() is not None and not train_ax.texts
    assert "| r | - | - | - | - |" in capsys.readouterr().out
