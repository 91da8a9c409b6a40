"""Both notebooks run headless, in their small fast mode, so that they never rot."""
import os

import pytest

from conftest import ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


def run_notebook(name):
    notebook = nbformat.read(ROOT / name, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")  # committed clean
    os.environ["NOTEBOOK_FAST"] = "1"  # the kernel inherits it
    try:
        nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        del os.environ["NOTEBOOK_FAST"]
    return "\n".join(output.get("text", "") + str(output.get("data", {}).get("text/plain", ""))
                     for cell in notebook.cells for output in cell.get("outputs", []))


def test_view_modules_notebook_runs_and_shows_every_module():
    text = run_notebook("view_modules.ipynb")
    for expected in ("RMSNorm.forward", "LayerNorm.forward", "CosineNorm.forward", "--- MQA: n_kv_heads=1",
                     "GatedMLP.forward", "layers.1.attention: CausalSelfAttention.forward", "slots filled"):
        assert expected in text


def test_model_comparison_notebook_runs_on_the_shipped_models():
    text = run_notebook("model_comparison.ipynb")
    assert "GPT2_1m_atto: Once upon a time" in text and "Llama3_1m_atto: The dog wanted to" in text
