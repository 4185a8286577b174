"""A run's log: metrics.jsonl (MetricsLog), and with `--report-to tensorboard` the same scalars (loss, acc, lr,
tokens/s, val/..., probe/...) as TensorBoard events in `<run>/tensorboard/`, written by the same log line.
TensorBoard is an optional extra (`pip install tensorboard`); torch.utils.tensorboard is imported only when asked for.
"""
from __future__ import annotations

from pathlib import Path

from bge.checkpoint import json_text
from bge.errors import UserError


class TensorBoard:
    """Writes every number of a metrics.jsonl record as a scalar at the record's step."""

    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's module raises this when the tensorboard package is missing
            raise UserError("--report-to tensorboard needs the tensorboard package: pip install tensorboard") from None
        self._make = SummaryWriter
        self.folder = Path(run_dir) / "tensorboard"
        self.writer = None

    def log(self, record: dict) -> None:
        if self.writer is None:
            # opened at the first record: a resumed run's first step drops the events a killed run wrote past it
            self.writer = self._make(str(self.folder), purge_step=record["step"], flush_secs=10)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def open_tracker(report_to: str, run_dir: Path) -> TensorBoard | None:
    """The logger --report-to asks for (None for 'none'); fails at once when its package is missing."""
    return TensorBoard(run_dir) if report_to == "tensorboard" else None


class MetricsLog:
    """The run's log: each record a line of metrics.jsonl (NaN as null, with why) and, with a tracker, TensorBoard
    scalars. Without a path (a rank other than 0) it writes nothing."""

    def __init__(self, path: Path | None, tracker: TensorBoard | None = None):
        self.file = open(path, "a", encoding="utf-8") if path else None
        self.tracker = tracker

    def __call__(self, record: dict) -> None:
        if self.file:
            self.file.write(json_text(record, indent=None) + "\n")
            self.file.flush()
        if self.tracker:
            self.tracker.log(record)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tracker:
            self.tracker.close()
