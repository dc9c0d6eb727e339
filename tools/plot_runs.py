#!/usr/bin/env python3
"""Plot validation (and training) loss of several runs from their ``metrics.jsonl``.

    python tools/plot_runs.py runs/baseline runs/all-three --labels baseline all-three \
        --output docs/convergence.png

Each run is a directory holding ``metrics.jsonl`` (the training driver writes it into
``--save``) or the file itself; event records (skipped steps, loss spikes) are not
plotted. Validation records (``val_loss``) are drawn against
consumed tokens (iterations when a run did not log tokens), training ``lm_loss`` in a
second panel; a panel no run has records for says so. A run resumed from a checkpoint
appends the iterations after it again: a record at an iteration before the last one
read, or a second one of its kind at the same iteration, drops the records from that
iteration on, so curves and table follow the resumed run, in iteration order. A
markdown table of final and best validation losses goes to stdout. The PNG is written
to a temporary name and renamed when complete. A missing or malformed metrics file or
an unwritable ``--output`` is reported as ``error: ...`` with exit status 2, as
argparse reports a bad command line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

EXIT_USAGE_ERROR = 2  # argparse's status for a bad command line
CURVES = {"val_loss": "validation loss", "lm_loss": "training loss"}  # record key: panel
Point = tuple[int, float, Optional[float]]  # iteration, x, loss (None: not finite)


class RunError(ValueError):
    """A run's metrics are missing or malformed (message names file and line)."""


@dataclass
class Run:
    """The curves of one run."""

    label: str
    val: list[tuple[float, float]] = field(default_factory=list)  # (x, val_loss)
    train: list[tuple[float, float]] = field(default_factory=list)  # (x, lm_loss)
    x_label: str = "tokens"


def metrics_path(run: str) -> Path:
    path = Path(run)
    return path / "metrics.jsonl" if path.is_dir() else path


def _repeats(curves: dict[str, list[Point]], iteration: int, keys: Sequence[str]) -> bool:
    """Whether a record of ``keys`` at ``iteration`` logs again what the curves hold: a resumed run."""
    return (any(curve and curve[-1][0] > iteration for curve in curves.values())
            or any(curves[key] and curves[key][-1][0] == iteration for key in keys))


def load_run(run: str, label: str) -> Run:
    """Read one run's records; x is consumed tokens, or iterations if tokens are absent.

    After a resume the curves keep the resumed run's records: per iteration the last one,
    in iteration order.
    """
    path = metrics_path(run)
    if not path.is_file():
        raise RunError(f"{path}: no such metrics file (expected a run directory with metrics.jsonl)")
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise RunError(f"{path}:{number}: not JSON ({err.msg})") from None
            if not isinstance(record, dict) or type(record.get("iteration")) is not int:
                raise RunError(f"{path}:{number}: expected a JSON object with an integer 'iteration' field")
            if "event" not in record:  # skipped steps and loss spikes are not curve points
                records.append(record)
    use_tokens = all(isinstance(r.get("consumed_tokens"), (int, float))
                     for r in records if any(key in r for key in CURVES))
    x_key = "consumed_tokens" if use_tokens else "iteration"
    curves: dict[str, list[Point]] = {key: [] for key in CURVES}
    for record in records:
        iteration, keys = record["iteration"], [key for key in CURVES if key in record]
        if _repeats(curves, iteration, keys):
            for curve in curves.values():
                while curve and curve[-1][0] >= iteration:
                    curve.pop()
        for key in keys:
            value = record[key]
            finite = isinstance(value, (int, float)) and math.isfinite(value)
            curves[key].append((iteration, float(record[x_key]), float(value) if finite else None))
    val, train = ([(x, loss) for _, x, loss in curves[key] if loss is not None] for key in CURVES)
    if not val and not train:
        raise RunError(f"{path}: no 'val_loss' or 'lm_loss' records")
    return Run(label=label, val=val, train=train, x_label="tokens" if use_tokens else "iteration")


def summary_table(runs: Sequence[Run]) -> str:
    """Markdown table: final and best validation loss (and perplexity) per run."""
    lines = ["| run | final val loss | final val ppl | best val loss | at " + runs[0].x_label + " |",
             "|---|---:|---:|---:|---:|"]
    for run in runs:
        if not run.val:
            lines.append(f"| {run.label} | - | - | - | - |")
            continue
        final = run.val[-1][1]
        best_x, best = min(run.val, key=lambda point: point[1])
        lines.append(f"| {run.label} | {final:.4f} | {math.exp(final):.2f} | {best:.4f} | {best_x:.0f} |")
    return "\n".join(lines)


def plot(runs: Sequence[Run], output: Path, title: Optional[str]) -> None:
    """Two panels (validation, training loss) in one PNG, written atomically; an empty one says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output.parent.mkdir(parents=True, exist_ok=True)
    fig, (val_ax, train_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        if run.val:
            val_ax.plot(*zip(*run.val), marker="o", markersize=3, label=run.label)
        if run.train:
            train_ax.plot(*zip(*run.train), linewidth=1, label=run.label)
    for ax, name in zip((val_ax, train_ax), CURVES.values()):
        ax.set_xlabel(runs[0].x_label)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
        else:
            ax.text(0.5, 0.5, f"no {name} records", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    temporary = output.with_name(f".{output.name}.tmp{os.getpid()}")
    try:
        fig.savefig(temporary, format="png", dpi=120)
        os.replace(temporary, output)
    finally:
        plt.close(fig)
        temporary.unlink(missing_ok=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Plot and print the table; 2 with ``error: ...`` on stderr for a bad run or output."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (with metrics.jsonl) or metrics files")
    parser.add_argument("--labels", nargs="+", help="one label per run (default: directory names)")
    parser.add_argument("--output", required=True, type=Path, help="PNG file to write")
    parser.add_argument("--title", help="figure title")
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        parser.error(f"--labels has {len(args.labels)} entries for {len(args.runs)} runs")
    labels = args.labels or [metrics_path(r).parent.name for r in args.runs]
    try:
        runs = [load_run(run, label) for run, label in zip(args.runs, labels)]
    except RunError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE_ERROR
    if len({run.x_label for run in runs}) > 1:
        print("error: some runs logged consumed tokens and some did not; cannot share an axis", file=sys.stderr)
        return EXIT_USAGE_ERROR
    try:
        plot(runs, args.output, args.title)
    except OSError as err:
        print(f"error: --output {args.output}: cannot write the PNG: {err.strerror or err}", file=sys.stderr)
        return EXIT_USAGE_ERROR
    print(summary_table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
