"""The sweep's table: one row per trial from Tune's results, the best trial, CSV and Markdown."""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctrl_ray.finetune_setup import FinetuneConfig
from ctrl_ray.tuning.configs import REPORTED_METRICS, SEARCHABLE

TABLE_COLUMNS = ("trial", "kl_weight", "gamma", "lr_embedding", "lr_adapter", "iterations",
                 "macro_f1", "accuracy", "mean_kl", "fidelity", "status", "eligible",
                 "mlflow_run_id")


@dataclass
class TrialRow:
    """One trial's outcome: its hyper-parameters and the metrics of its last report."""

    trial: str
    params: dict[str, float]
    iterations: int
    metrics: dict[str, float]
    status: str  # completed | stopped (by the scheduler) | error
    eligible: bool = False
    mlflow_run_id: str | None = None
    checkpoint: Any = None  # ray.tune.Checkpoint of the last report
    error: str | None = None

    def table_row(self) -> dict[str, Any]:
        return {"trial": self.trial, **self.params, "iterations": self.iterations,
                **{k: self.metrics.get(k) for k in ("macro_f1", "accuracy", "mean_kl",
                                                    "fidelity")},
                "status": self.status, "eligible": self.eligible,
                "mlflow_run_id": self.mlflow_run_id}


def trial_rows(results, base: FinetuneConfig) -> list[TrialRow]:
    """One row per trial from Tune's results, with the effective hyper-parameters."""
    objective = base.objective
    rows = []
    for result in results:
        reported = result.metrics or {}
        params = {name: float(result.config.get(name, getattr(objective, name)))
                  for name in SEARCHABLE}
        iterations = int(reported.get("iteration", 0))
        if result.error is not None:
            status = "error"
        elif iterations >= base.iterations:
            status = "completed"
        else:
            status = "stopped"
        rows.append(TrialRow(
            trial=str(reported.get("trial_id") or Path(result.path).name), params=params,
            iterations=iterations,
            metrics={k: float(v) for k, v in reported.items()
                     if k in REPORTED_METRICS or k.endswith(("_macro_f1", "_accuracy"))},
            status=status, mlflow_run_id=reported.get("mlflow_run_id"),
            checkpoint=result.checkpoint,
            error=None if result.error is None else f"{type(result.error).__name__}: "
                                                    f"{result.error}"[:500]))
    return rows


def pick_best(rows: list[TrialRow], metric: str, mode: str, kl_budget: float | None
              ) -> TrialRow | None:
    """The trial with the best last-reported `metric` among those that reported it with a mean
    KL within `kl_budget` (all, if None); ties go to the lower KL. Marks `eligible` on rows."""
    for row in rows:
        row.eligible = (row.status != "error" and metric in row.metrics
                        and row.checkpoint is not None
                        and (kl_budget is None or row.metrics.get("mean_kl", math.inf)
                             <= kl_budget))
    eligible = [row for row in rows if row.eligible]
    if not eligible:
        return None
    return max(eligible, key=lambda row: (score(row, metric, mode),
                                          -row.metrics.get("mean_kl", math.inf)))


def write_table(rows: list[TrialRow], out: Path) -> tuple[Path, Path]:
    """`trials.csv` and `trials.md` under `out`: one line per trial, in the given order."""
    table = [row.table_row() for row in rows]
    csv_path, markdown_path = out / "trials.csv", out / "trials.md"
    with open(csv_path.with_suffix(".csv.tmp"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=TABLE_COLUMNS)
        writer.writeheader()
        writer.writerows(table)
    os.replace(csv_path.with_suffix(".csv.tmp"), csv_path)
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |",
             "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"]
    lines += ["| " + " | ".join(_cell(entry.get(column)) for column in TABLE_COLUMNS) + " |"
              for entry in table]
    markdown_path.with_suffix(".md.tmp").write_text("\n".join(lines) + "\n")
    os.replace(markdown_path.with_suffix(".md.tmp"), markdown_path)
    return csv_path, markdown_path


def score(row: TrialRow, metric: str, mode: str) -> float:
    value = row.metrics.get(metric)
    if value is None or math.isnan(value):
        return -math.inf
    return value if mode == "max" else -value


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_params(params: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in params.items())
