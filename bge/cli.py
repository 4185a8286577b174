"""Console scripts of the installed package (pyproject.toml): bge-train, bge-evaluate, bge-sweep, bge-mine.

train.py, evaluate.py and sweep.py live at the repository root and are run from a checkout as `python train.py`;
installed, they are the modules bge_scripts.train, .evaluate and .sweep. Each script prints a bad input as one line.
"""
from __future__ import annotations

from bge.console import run_cli


def train() -> None:
    from bge_scripts.train import main

    run_cli(main)


def evaluate() -> None:
    from bge_scripts.evaluate import main

    run_cli(main)


def sweep() -> None:
    from bge_scripts.sweep import main

    run_cli(main)


def mine() -> None:
    from bge.mine import main

    run_cli(main)
