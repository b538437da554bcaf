"""The bento's package list (bentofile.yaml) and the project's dependencies (pyproject.toml) are two
lists of one set of pins: a package added or re-pinned in one must be the same in the other."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# In pyproject only: the dynamo ONNX exporter (an opt-in of `loraplex onnx export`), never run in the image.
NOT_IN_BENTO = {"onnxscript"}


def _by_name(specs: list[str]) -> dict[str, str]:
    return {
        re.split(r"[=<>!~\[; ]", s, maxsplit=1)[0].lower().replace("_", "-"): s.replace(" ", "")
        for s in specs
    }


def test_the_bento_pins_every_dependency_as_pyproject_does():
    project = _by_name(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])
    bento = _by_name(yaml.safe_load((REPO / "bentofile.yaml").read_text())["python"]["packages"])
    assert set(project) - set(bento) == NOT_IN_BENTO, "a dependency the image lacks (or an exception gone)"
    assert set(bento) <= set(project), f"in the bento only: {set(bento) - set(project)}"
    differ = {n: (project[n], bento[n]) for n in bento if project[n] != bento[n]}
    assert differ == {}, f"pinned differently (pyproject, bentofile): {differ}"
