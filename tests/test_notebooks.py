"""Every notebook runs top to bottom, headless, with small settings (SEQVAE_NOTEBOOK_SMALL=1)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_four_notebooks():
    assert [p.stem[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04"]


RETRAIN = [p for p in NOTEBOOKS if p.stem.startswith("01")]  # the switch that trains instead of loading the shipped model


@pytest.mark.parametrize("path, retrain", [(p, False) for p in NOTEBOOKS] + [(p, True) for p in RETRAIN],
                         ids=[p.stem for p in NOTEBOOKS] + [p.stem + "-retrain" for p in RETRAIN])
def test_notebook_runs(path, retrain, tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("SEQVAE_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("SEQVAE_NOTEBOOK_RETRAIN", "1" if retrain else "0")
    monkeypatch.setenv("SEQVAE_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("SEQVAE_DATA", str(data_dir))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {}) or "image/gif" in o.get("data", {})]
    assert images, "the notebook displayed no figure"
    assert not any(tmp_path.glob("*.ipynb"))
