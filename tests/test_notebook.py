"""The Colab notebook runs top to bottom (nbclient, a real Jupyter kernel) on the shared data."""

import base64
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "examples" / "gpt1_jax_colab.ipynb"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _outputs(cell) -> str:
    """What a cell printed (stdout) and displayed; logging on stderr is left out."""
    return "".join((o.get("text", "") if o.get("name") != "stderr" else "")
                   + "".join(str(v) for v in o.get("data", {}).values()) for o in cell.outputs)


@pytest.mark.slow
def test_notebook_executes_and_shows_every_result(tmp_path, monkeypatch, data_root):
    monkeypatch.setenv("GPT1_JAX_DATA", str(data_root))
    monkeypatch.setenv("GPT1_JAX_NOTEBOOK_FINETUNE_EXAMPLES", "64")
    monkeypatch.setenv("GPT1_JAX_NOTEBOOK_PRETRAIN_STEPS", "20")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()

    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not any(o.output_type == "error" for o in cell.outputs) for cell in code)
    finetune, generation, curves, pretrain = (_outputs(cell) for cell in code[2:6])
    assert finetune.count("| sst2 | validation | accuracy |") == 2
    assert "pre-trained (mini)" in finetune and "scratch (no pre-training)" in finetune
    samples = generation.splitlines()
    assert [line.split(":")[0] for line in samples] == ["greedy", "top-p 0.9"]
    assert all("the old man looked at us and said" in line and len(line.split()) > 15 for line in samples)
    images = [base64.b64decode(o.data["image/png"]) for o in code[4].outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2 and all(image.startswith(PNG_MAGIC) for image in images)
    assert "| sst2" in curves or "sst2 |" in curves
    assert sorted(p.name for p in (tmp_path / "runs" / "plots").iterdir()) == ["mini-sst2.png", "scratch-sst2.png"]
    assert "val_perplexity" in pretrain and "zeroshot/sst2" in pretrain
