"""What the package promises about itself agrees everywhere it is said."""

from __future__ import annotations

import re
import sys
import tomllib

from conftest import ROOT


def test_python_version_is_stated_once_and_met() -> None:
    """pyproject, mypy, ruff and the README name the same oldest Python, and the suite runs on it or later."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    floor = re.fullmatch(r">=3\.(\d+)", project["project"]["requires-python"])
    assert floor, project["project"]["requires-python"]
    minor = int(floor.group(1))
    assert project["tool"]["mypy"]["python_version"] == f"3.{minor}"
    assert project["tool"]["ruff"]["target-version"] == f"py3{minor}"
    assert f"`python3` (3.{minor}+)" in (ROOT / "README.md").read_text()
    assert sys.version_info >= (3, minor)
