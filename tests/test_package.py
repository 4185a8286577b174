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


def git_commit_of_a_copy(where: Path, cwd: Path) -> str:
    """train.git_commit() of a copy of train.py placed in `where`, run from `cwd` (-P: not the cwd's train.py)."""
    where.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "train.py", where / "train.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(where), str(REPO)])}
    r = subprocess.run([sys.executable, "-P", "-c", "import train; print(train.git_commit())"], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_git_txt_names_the_checkout_of_train_py_not_the_working_directory(tmp_path) -> None:
    other = tmp_path / "other-repo"  # a git repository that is not bge's: as cwd, and holding an installed copy
    other.mkdir()
    subprocess.run(["git", "init", "-q", str(other)], check=True)
    unknown = f"unknown (not a git checkout: bge-finetune {bge.__version__})"
    assert git_commit_of_a_copy(tmp_path / "site-packages" / "bge_scripts", cwd=REPO) == unknown
    assert git_commit_of_a_copy(other / ".venv" / "site-packages" / "bge_scripts", cwd=other) == unknown
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    r = subprocess.run([sys.executable, "-c", "import train; print(train.git_commit())"], cwd=other,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert r.stdout.strip().removesuffix("-dirty") == head
