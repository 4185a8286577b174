"""`--report-to tensorboard`: the scalars of metrics.jsonl (loss, acc, lr, tokens/s, val/..., probe/...) also written
as TensorBoard events in `<run>/tensorboard/`, by the same log line. TensorBoard is an optional extra
(`pip install tensorboard`); torch.utils.tensorboard is imported only when asked for.
"""
from __future__ import annotations

from pathlib import Path

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
