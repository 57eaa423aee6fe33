"""Notebooks run top to bottom (their code cells, in order, in one namespace)."""

from __future__ import annotations

import json

import pytest
from conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
SLOW = {"train_3d_hippocampus", "segmentation_2d"}  # they train models: 20-90 s on 2 cores


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if p.stem in SLOW else p for p in NOTEBOOKS],
                         ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    monkeypatch.chdir(REPO)
    nb = json.loads(path.read_text())
    namespace: dict = {"__name__": "__main__"}
    for i, cell in enumerate(c for c in nb["cells"] if c["cell_type"] == "code"):
        assert not cell.get("outputs"), f"{path.name}: cell {i} was saved with outputs"
        exec(compile("".join(cell["source"]), f"{path.name}[{i}]", "exec"), namespace)
