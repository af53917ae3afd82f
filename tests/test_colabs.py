"""Executes every notebook in colabs/ headless (nbclient, kernel python3, cwd colabs/); any cell error fails.

Notebooks read their sizes from ``SQATTN_COLAB_*`` environment variables (see the settings cell of
colabs/quickstart.ipynb); this test sets them for a run of a few tiny steps on one CPU device, with the test
session's persistent compilation cache, and puts the checkout on ``PYTHONPATH`` so the install cell is skipped.
"""

import glob
import json
import os

import jax
import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(REPO, "colabs")
NOTEBOOKS = sorted(glob.glob(os.path.join(COLABS, "*.ipynb")))

TINY = {
    "SQATTN_COLAB_STEPS": "3",
    "SQATTN_COLAB_BATCH": "4",
    "SQATTN_COLAB_SEQ_LEN": "32",
    "SQATTN_COLAB_D_MODEL": "32",
    "SQATTN_COLAB_LAYERS": "1",
    "SQATTN_COLAB_EVAL_EVERY": "2",
    "SQATTN_COLAB_MAX_NEW_TOKENS": "16",
    "SQATTN_COLAB_TUNE_STEPS": "2",
    "SQATTN_COLAB_EVAL_TOKENS": "256",
}


def test_colabs_exist():
    assert NOTEBOOKS, f"no notebooks in {COLABS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes(path, tmp_path, monkeypatch):
    workdir = tmp_path / "workdir"
    for key, val in {**TINY, "SQATTN_COLAB_WORKDIR": str(workdir),
                     "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                     "JAX_PLATFORMS": "cpu",
                     "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
                     "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir or "",
                     "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}.items():
        monkeypatch.setenv(key, val)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=300,
                            resources={"metadata": {"path": COLABS}})
    client.execute()   # raises CellExecutionError naming the failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, errors
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.get("outputs", []) if o.get("output_type") == "stream")
    if os.path.basename(path) == "reuse_trained_lm.ipynb":
        assert "teacher weights unused: []" in printed           # every teacher weight was transplanted
        assert "merged vs unmerged bits/byte" in printed and "tokens per base forward" in printed
        assert os.listdir(workdir / "liger" / "checkpoints") and os.listdir(workdir / "base" / "checkpoints")
    if os.path.basename(path) == "quickstart.ipynb":
        with open(workdir / "metrics.jsonl") as f:
            records = [json.loads(line) for line in f if line.strip()]
        assert max(r["step"] for r in records) == int(TINY["SQATTN_COLAB_STEPS"])
        assert any("eval_loss" in r for r in records)
        assert os.listdir(workdir / "checkpoints")
        assert "'def " in printed      # the batched greedy samples were printed


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebooks_import_only_the_package(path):
    """Notebooks hold no model or training code of their own and import sqattn, never the experiment binaries."""
    nb = nbformat.read(path, as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "from experiments" not in code and "import experiments" not in code
