"""A run's metrics, written three ways: metrics.jsonl, metrics.csv and TensorBoard events.

    metrics.jsonl  one JSON record per line (the full record; non-finite values as null,
                   named under "nonfinite")
    metrics.csv    the same records as a table for spreadsheets: one row per record, a fixed
                   header (COLUMNS, then the validation keys of the run), empty cells for
                   keys a record does not have, "nan" for non-finite values
    tensorboard/   event files (scalars by name: train/loss, valid/valid_elbo, ...), written
                   when the `tensorboard` package is installed (`pip install seqvae[tensorboard]`)

On resume, records written after the checkpoint are dropped from the JSON and CSV files
(they were written by the run that died): the checkpoint stores how many records had been
written (`records`), so the cut is exact even when a record shares the checkpoint's step;
TensorBoard purges the steps after it (purge_step).
`read_metrics(run_dir)` reads metrics.jsonl, else metrics.csv, for `seqvae viz --what curves`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_bytes

__all__ = ["RunLog", "read_metrics", "COLUMNS", "progress_bar"]

COLUMNS = ["kind", "epoch", "step", "loss", "grad_norm", "beta", "lr", "nonfinite_total", "seconds"]


def progress_bar(**options):
    """tqdm.auto's bar (a widget in Jupyter when ipywidgets is installed, text otherwise), without
    its warning about a missing ipywidgets."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from tqdm.auto import tqdm
    return tqdm(**options)


class RunLog:
    """Appends metric records to a run folder's jsonl and csv files (and TensorBoard)."""

    def __init__(self, run_dir: str | os.PathLike, valid_keys: list[str], *, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.columns = COLUMNS + [k for k in valid_keys if k not in COLUMNS] + ["nonfinite"]
        self._tensorboard = tensorboard
        self._writer = None
        self.records = 0  # records written to metrics.jsonl so far (stored in checkpoints)

    @property
    def jsonl(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def csv(self) -> Path:
        return self.run_dir / "metrics.csv"

    def write(self, record: dict[str, Any]) -> None:
        bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
        shown = record
        if bad:  # JSON has no NaN: such values are written as null and named
            shown = {**{k: (None if k in bad else v) for k, v in record.items()}, "nonfinite": bad}
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(shown) + "\n")
        self.records += 1
        new = not self.csv.exists() or self.csv.stat().st_size == 0
        with open(self.csv, "a", newline="") as f:
            if new:
                f.write(self._header())
            f.write(self._row(record, bad))
        self._scalars(record)

    def _header(self) -> str:
        out = io.StringIO()
        csv.writer(out).writerow(self.columns)
        return out.getvalue()

    def _row(self, record: dict[str, Any], bad: list[str]) -> str:
        def cell(key):
            if key == "nonfinite":
                return " ".join(bad)
            value = record.get(key)
            return "" if value is None else ("nan" if key in bad else value)

        out = io.StringIO()
        csv.writer(out).writerow([cell(k) for k in self.columns])
        return out.getvalue()

    def _scalars(self, record: dict[str, Any]) -> None:
        writer = self._tb()
        if writer is None:
            return
        group = record.get("kind", "train")
        for key, value in record.items():
            if key not in ("kind", "epoch", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(f"{group}/{key}", value, record.get("step", 0))
        writer.flush()

    def _tb(self, purge_step: int | None = None):
        if self._writer is None and self._tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the tensorboard package is not installed: the extra is optional
                self._tensorboard = False
                return None
            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge_step)
        return self._writer

    def truncate(self, step: int, records: int | None = None) -> None:
        """Keep the first `records` records (those the checkpoint had seen), or, for a checkpoint
        that did not count them, those up to `step`; rewrite the csv to match."""
        if self._tensorboard:
            self._tb(purge_step=step + 1)
        if not self.jsonl.exists():
            self.csv.unlink(missing_ok=True)
            return
        kept = _read_jsonl(self.jsonl)
        kept = kept[:records] if records is not None else [r for r in kept if r.get("step", 0) <= step]
        atomic_write_bytes(self.jsonl, "".join(json.dumps(r) + "\n" for r in kept).encode())
        rows = "".join(self._row({k: (math.nan if k in r.get("nonfinite", []) else v) for k, v in r.items()},
                                 list(r.get("nonfinite", []))) for r in kept)
        atomic_write_bytes(self.csv, (self._header() + rows).encode())
        self.records = len(kept)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """A run's records from metrics.jsonl, else metrics.csv (numbers parsed, empty cells dropped)."""
    run_dir = Path(run_dir)
    if (run_dir / "metrics.jsonl").exists():
        return _read_jsonl(run_dir / "metrics.jsonl")
    if (run_dir / "metrics.csv").exists():
        with open(run_dir / "metrics.csv", newline="") as f:
            return [{k: _number(v) for k, v in row.items() if v not in ("", None) and k != "nonfinite"} for row in csv.DictReader(f)]
    raise FileNotFoundError(f"{run_dir} holds neither metrics.jsonl nor metrics.csv: training curves need a run folder")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, skipping a line cut short by a kill."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
