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
