"""The installable package (pyproject.toml): a wheel built offline holds bge, the root scripts as bge_scripts and
the console scripts; train.py's git.txt does not depend on the working directory."""
from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import bge

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("bge", "train.py", "evaluate.py", "sweep.py", "pyproject.toml", "README.md", "requirements.txt")


def test_wheel_holds_the_package_the_scripts_and_the_entry_points(tmp_path) -> None:
    src = tmp_path / "src"  # a copy: building in the checkout would leave build/ and egg-info behind
    src.mkdir()
    for name in SOURCES:
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, src / name)
    env = {**os.environ, "PIP_NO_INDEX": "1"}  # offline: the venv's setuptools builds it
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path / "out"), str(src)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = (tmp_path / "out").glob("*.whl")
    assert wheel.name == f"bge_finetune-{bge.__version__}-py3-none-any.whl"
    names = set(zipfile.ZipFile(wheel).namelist())
    package = {p.relative_to(REPO).as_posix() for p in (REPO / "bge").glob("*.py")}
    assert package <= names
    assert {"bge_scripts/train.py", "bge_scripts/evaluate.py", "bge_scripts/sweep.py"} <= names
    assert not any(n.startswith(("tests/", "benchmarks/", "examples/", "train.py", "evaluate.py")) for n in names)
    info = f"bge_finetune-{bge.__version__}.dist-info"
    entry_points = configparser.ConfigParser()
    entry_points.read_string(zipfile.ZipFile(wheel).read(f"{info}/entry_points.txt").decode())
    assert dict(entry_points["console_scripts"]) == {"bge-train": "bge.cli:train", "bge-evaluate": "bge.cli:evaluate",
                                                     "bge-sweep": "bge.cli:sweep", "bge-mine": "bge.cli:mine"}
    metadata = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    requires = [l.split(": ", 1)[1] for l in metadata.splitlines() if l.startswith("Requires-Dist: ")]
    runtime = [l.strip() for l in (REPO / "requirements.txt").read_text().splitlines() if l.strip()[:1].isalnum()]
    assert sorted(r for r in requires if "extra ==" not in r) == sorted(r.replace(">=2.4,<3", "<3,>=2.4")
                                                                        for r in runtime)
    extras = {'matplotlib; extra == "plot"', 'tensorboard; extra == "tensorboard"', 'pytest; extra == "dev"'}
    assert extras <= set(requires)


def test_console_script_targets_exist() -> None:
    from bge import cli

    assert all(callable(getattr(cli, f)) for f in ("train", "evaluate", "sweep", "mine"))


def test_git_txt_names_the_checkout_bge_runs_from_not_the_working_directory(tmp_path, monkeypatch) -> None:
    from bge.rundir import PACKAGE_ROOT, git_commit

    other = tmp_path / "other-repo"  # a git repository that is not bge's: as cwd, and holding an installed copy
    other.mkdir()
    subprocess.run(["git", "init", "-q", str(other)], check=True)
    monkeypatch.chdir(other)
    unknown = f"unknown (not a git checkout: bge-finetune {bge.__version__})"
    (tmp_path / "site-packages").mkdir()
    (other / ".venv" / "site-packages").mkdir(parents=True)
    assert git_commit(tmp_path / "site-packages") == unknown  # installed, outside any repository
    assert git_commit(other / ".venv" / "site-packages") == unknown  # installed in a venv inside another repository
    assert PACKAGE_ROOT == REPO
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert git_commit().removesuffix("-dirty") == head  # the checkout of bge/, though the cwd is another repository


def test_a_log_file_or_a_pipe_gets_whole_lines_not_80_columns(tmp_path) -> None:
    """What the CLIs print to a file or a pipe (how long runs are logged) keeps its lines whole: at rich's 80 columns
    for a non-terminal, a path broke onto a second line and a results table cut its numbers to '0.71…'."""
    code = ("from rich.table import Table\n"
            "from bge.console import console, console_for\n"
            "console.print('wrote ' + '/run' * 40, markup=False, highlight=False)\n"
            "table = Table(*(f'column {i}' for i in range(10)))\n"
            "table.add_row(*(f'0.7123 ± 0.0{i}45' for i in range(10)))\n"
            "console_for('stdout').print(table)\n")
    for columns in (None, "80"):  # rich reads COLUMNS, which pytest exports as 80, when no width is given
        env = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | ({"COLUMNS": columns} if columns else {})
        log = tmp_path / "log.txt"
        with log.open("w") as f:
            r = subprocess.run([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=f, text=True,
                               env=env)
        assert r.returncode == 0, log.read_text()
        assert log.read_text() == "wrote " + "/run" * 40 + "\n"
        assert "…" not in r.stdout and all(f"0.7123 ± 0.0{i}45" in r.stdout for i in range(10)), r.stdout
