"""pyproject's Python range: 3.11-3.13 install (issue 11; every pinned wheel exists for them)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.specifiers import SpecifierSet


def test_python_3_11_to_3_13_are_accepted():
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    allowed = SpecifierSet(project["project"]["requires-python"])
    assert all(v in allowed for v in ("3.11.7", "3.12.0", "3.13.1"))
    assert "3.10.14" not in allowed
