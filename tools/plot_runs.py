#!/usr/bin/env python3
"""Plot validation (and training) loss of several runs from their ``metrics.jsonl``.

    python tools/plot_runs.py runs/baseline runs/all-three --labels baseline all-three \
        --output docs/convergence.png

Each run is a directory holding ``metrics.jsonl`` (the training driver writes it into
``--save``) or the file itself; event records (skipped steps, loss spikes) are not
plotted. Validation records (``val_loss``) are drawn against
consumed tokens (iterations when a run did not log tokens), training ``lm_loss`` in a
second panel. A markdown table of final and best validation losses goes to stdout.
The PNG is written to a temporary name and renamed when complete.
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


def load_run(run: str, label: str) -> Run:
    """Read one run's records; x is consumed tokens, or iterations if tokens are absent."""
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
            if not isinstance(record, dict) or "iteration" not in record:
                raise RunError(f"{path}:{number}: expected a JSON object with an 'iteration' field")
            if "event" not in record:  # skipped steps and loss spikes are not curve points
                records.append(record)
    use_tokens = all("consumed_tokens" in r for r in records if "val_loss" in r or "lm_loss" in r)
    x_key = "consumed_tokens" if use_tokens else "iteration"
    run_curves = Run(label=label, x_label="tokens" if use_tokens else "iteration")
    for record in records:
        for key, curve in (("val_loss", run_curves.val), ("lm_loss", run_curves.train)):
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                curve.append((float(record[x_key]), float(value)))
    if not run_curves.val and not run_curves.train:
        raise RunError(f"{path}: no 'val_loss' or 'lm_loss' records")
    return run_curves


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
    """Two panels (validation, training loss) in one PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (val_ax, train_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        if run.val:
            val_ax.plot(*zip(*run.val), marker="o", markersize=3, label=run.label)
        if run.train:
            train_ax.plot(*zip(*run.train), linewidth=1, label=run.label)
    for ax, name in ((val_ax, "validation loss"), (train_ax, "training loss")):
        ax.set_xlabel(runs[0].x_label)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(f".{output.name}.tmp{os.getpid()}")
    try:
        fig.savefig(temporary, format="png", dpi=120)
        os.replace(temporary, output)
    finally:
        plt.close(fig)
        temporary.unlink(missing_ok=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
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
        return 1
    if len({run.x_label for run in runs}) > 1:
        print("error: some runs logged consumed tokens and some did not; cannot share an axis", file=sys.stderr)
        return 1
    plot(runs, args.output, args.title)
    print(summary_table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
