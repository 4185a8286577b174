"""Console scripts of the installed package (pyproject.toml): bge-train, bge-evaluate, bge-mine.

train.py and evaluate.py live at the repository root and are run from a checkout as `python train.py`; installed,
they are the modules bge_scripts.train and bge_scripts.evaluate. Each script prints a bad input as one line.
"""
from __future__ import annotations

from bge.console import run_cli


def train() -> None:
    from bge_scripts.train import main

    run_cli(main)


def evaluate() -> None:
    from bge_scripts.evaluate import main

    run_cli(main)


def mine() -> None:
    from bge.mine import main

    run_cli(main)
