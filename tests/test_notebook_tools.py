"""The notebook rules: jupytext pairs in sync, no outputs committed, failures named precisely."""
import json

import nbformat
import pytest

from sawyer import notebooks, workshop


def test_committed_notebooks_are_in_sync_and_without_outputs():
    assert notebooks.sources(), "no notebooks/NN_*.py sources found"
    assert notebooks.check() == []


def _write_source(folder, text):
    (folder / "01_demo.py").write_text(text)


def test_check_reports_out_of_sync_outputs_and_missing(tmp_path):
    _write_source(tmp_path, "# %% [markdown]\n# Hello\n\n# %%\nx = 1\n")
    assert any("missing" in p for p in notebooks.check(tmp_path))
    notebooks.sync(tmp_path)
    assert notebooks.check(tmp_path) == []
    nb = nbformat.read(tmp_path / "01_demo.ipynb", as_version=4)
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", text="1\n")]
    nbformat.write(nb, tmp_path / "01_demo.ipynb")
    assert any("carries outputs" in p for p in notebooks.check(tmp_path))
    notebooks.sync(tmp_path)
    _write_source(tmp_path, "# %% [markdown]\n# Hello\n\n# %%\nx = 2\n")
    assert any("out of sync" in p for p in notebooks.check(tmp_path))


def test_a_failing_cell_is_reported_with_notebook_cell_and_error(tmp_path):
    _write_source(tmp_path, "# %% tags=[\"parameters\"]\nvalue = 1\n\n# %%\ny = value + 1\n\n# %%\n"
                            "raise ValueError(f'bad value {value}')\n")
    notebooks.sync(tmp_path)
    with pytest.raises(notebooks.NotebookFailed) as err:
        notebooks.execute(tmp_path / "01_demo.ipynb", tmp_path / "out" / "01_demo.ipynb", {"value": 41})
    assert err.value.notebook == "01_demo.ipynb"
    assert err.value.cell == 2
    assert "ValueError: bad value 41" in err.value.error
    assert (tmp_path / "out" / "01_demo.ipynb").exists()


def test_stage_markers_and_missing_stage_message(tmp_path):
    with pytest.raises(RuntimeError, match="02_sft.*run notebook"):
        workshop.require_stages(tmp_path, "02_sft")
    workshop.finish_stage(tmp_path, "02_sft", {"eval_loss_after": 0.5})
    workshop.require_stages(tmp_path, "02_sft")
    m = json.loads((tmp_path / "02_sft" / "metrics.json").read_text())
    assert m["eval_loss_after"] == 0.5 and m["wall_seconds"] >= 0 and m["peak_cpu_rss_gib"] > 0  # + time, memory
