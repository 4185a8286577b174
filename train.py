"""Fine-tune a BGE embedding model on domain data (retrieval, STS pairs, classification rows, or a mix), then show
how the held-out test set changed: the command line of bge.training.train (installed: `bge-train`).

    python train.py --data examples/bike_repair.jsonl
    python train.py --data ../shared/data/scifact --split train --model BAAI/bge-small-en-v1.5
    python train.py --data ../shared/data/stsb/sts-train.tsv --test ../shared/data/stsb/sts-dev.tsv
    python train.py --data examples/bike_repair.jsonl examples/bike_tickets.jsonl   # several files
    python train.py --resume checkpoints/<run>

Every flag is a field of bge.config.TrainConfig (`--help` lists them). The run itself, set-up, the loop and the
ending, reads top to bottom in bge/training.py; from Python: `from bge import TrainConfig, train`.
"""
from __future__ import annotations

import shlex
import sys

from bge.config import parse_args
from bge.console import run_cli
from bge.training import train


def main(argv: list[str] | None = None) -> None:
    cfg, explicit = parse_args(argv)  # explicit: the flags given, which --resume may override
    train(cfg, explicit, command=shlex.join([sys.executable, *sys.argv]))


if __name__ == "__main__":
    run_cli(main)
