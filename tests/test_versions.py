"""The torch versions the project builds and tests against are named once, in pyproject.toml."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PINS = PYPROJECT["tool"]["block_attn"]
SCRIPTS = ["scripts/install.sh", "scripts/cuda_compile_check.sh"]


def test_scripts_read_the_pins():
    for kind in ("torch-cpu", "torch-cuda"):
        printed = subprocess.run(
            ["bash", str(ROOT / "scripts" / "pinned_torch.sh"), kind],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert printed == PINS[kind], f"pinned_torch.sh {kind} printed {printed!r}"
    for script in SCRIPTS:
        text = (ROOT / script).read_text()
        literal = re.findall(r"torch==\d[\w.]*", text)
        assert not literal, f"{script} names {literal} instead of reading pyproject.toml"
        assert "pinned_torch.sh" in text, f"{script} does not read scripts/pinned_torch.sh"


def test_minimum_torch_is_the_oldest_pin():
    oldest = min(PINS.values(), key=lambda v: tuple(int(x) for x in v.split(".")))
    minimum = ".".join(oldest.split(".")[:2])
    for requirement in (
        *PYPROJECT["project"]["dependencies"],
        *PYPROJECT["build-system"]["requires"],
    ):
        if requirement.startswith("torch"):
            assert requirement == f"torch>={minimum}", f"{requirement!r} is not torch>={minimum}"


def test_documents_name_only_pinned_versions():
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "CMakeLists.txt"]
    for document in documents:
        for version in re.findall(r"torch==(\d[\w.]*)", document.read_text()):
            assert version in PINS.values(), f"{document.name} names torch=={version}, not a pin"
