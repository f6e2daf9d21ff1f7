"""The Colab notebook (notebooks/cellnet_colab.ipynb) runs end to end, on the CPU, with tiny parameters.

The notebook's cell tagged ``parameters`` holds the GPU paper run; like papermill, the test adds a
cell after it that overrides those values (cpu preset, one epoch of one step, width 0.125, 64-px
crops, one residual unit per stage, a 4-patient synthetic set: the fewest that fill every split) and runs every cell with
nbclient, in a kernel of this interpreter.
The committed file must carry no outputs, so what is in git is what a user runs.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "cellnet_colab.ipynb"
#: What the test runs instead of the defaults: everything as small as cellnet allows.
TINY = dict(DATA="synthetic", SYNTH_PATIENTS=4, SYNTH_SMALL=True, SLIDE=None, PRESET="cpu", EPOCHS=1, STEPS=1,
            CELLULARITY_EPOCHS=1, FINETUNE_EPOCHS=0, BATCH_SIZE=2, WIDTH=0.125, CROP=64,
            MIXED_PRECISION=False, JIT=False, IN_COLAB=False, INSTALL=False, SHOW_TENSORBOARD=False,
            STAGE_BLOCKS=(1, 1, 1, 1))
#: Seconds any one cell may take before the run counts as hung.
CELL_TIMEOUT = 600


def read_notebook() -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    return nb


def parameters_index(nb: nbformat.NotebookNode) -> int:
    tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


def default_parameters() -> dict:
    nb = read_notebook()
    namespace: dict = {}
    exec(nb.cells[parameters_index(nb)].source, namespace)  # assignments (and `import sys`) only
    return namespace


def cell_seconds(nb: nbformat.NotebookNode) -> dict[str, float]:
    """Seconds each executed cell took (nbclient's timing metadata), by cell id."""
    from datetime import datetime

    seconds = {}
    for cell in nb.cells:
        timing = cell.metadata.get("execution", {})
        if "iopub.execute_input" in timing and "shell.execute_reply" in timing:
            begin, end = (datetime.fromisoformat(timing[k].replace("Z", "+00:00"))
                          for k in ("iopub.execute_input", "shell.execute_reply"))
            seconds[cell.get("id", "?")] = round((end - begin).total_seconds(), 1)
    return seconds


def test_committed_notebook_has_no_outputs():
    nb = read_notebook()
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {i} has outputs: strip them before committing " \
                                     f"(jupyter nbconvert --clear-output --inplace {NOTEBOOK.name}, or nbstripout)"
            assert cell.execution_count is None, f"cell {i} has an execution count: strip the outputs"
    assert "widgets" not in nb.metadata


def test_defaults_are_the_gpu_paper_run():
    params = default_parameters()
    assert params["PRESET"] == "paper"
    assert params["MIXED_PRECISION"] is True
    assert params["DATA"] == "synthetic"
    assert params["INSTALL"] is True
    for name in ("EPOCHS", "STEPS", "CELLULARITY_EPOCHS", "FINETUNE_EPOCHS", "BATCH_SIZE", "WIDTH", "CROP",
                 "STAGE_BLOCKS"):
        assert params[name] is None, f"{name} must default to the preset's value"
    assert set(TINY) <= set(params), f"the test overrides unknown parameters: {set(TINY) - set(params)}"


def test_notebook_runs_on_cpu_with_tiny_parameters(tmp_path):
    from nbclient import NotebookClient

    nb = read_notebook()
    work = tmp_path / "work"
    injected = "\n".join([
        "# parameters injected by tests/test_notebook.py",
        *(f"{name} = {value!r}" for name, value in {**TINY, "WORK": str(work)}.items()),
        "import os, sys",
        'os.environ["CUDA_VISIBLE_DEVICES"] = "-1"  # the CPU, before TensorFlow loads',
        f"assert sys.prefix == {sys.prefix!r}, f'kernel runs {{sys.executable}}, not this environment'",
    ])
    cell = nbformat.v4.new_code_cell(injected, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(parameters_index(nb) + 1, cell)
    start = time.time()
    try:
        NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:  # the executed copy, outputs and all, is kept with the test's tmp_path for a look
        nbformat.write(nb, str(tmp_path / "executed.ipynb"))
        print(f"notebook ran {time.time() - start:.1f} s; per cell: {cell_seconds(nb)}")

    assert (work / "report" / "report.md").read_text().strip()
    assert (work / "saved_models" / "sr_cascade" / "1" / "saved_model.pb").is_file()
    rows = (work / "predictions" / "sr_cascade.csv").read_text().splitlines()
    assert rows[0].startswith("slide,rid,p") and len(rows) > 1
    heatmap = work / "slide" / "slide_from_patches_heatmap.png"
    assert heatmap.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shown = [cell for cell in nb.cells if cell.cell_type == "code"
             and any("image/png" in out.get("data", {}) for out in cell.outputs)]
    assert any("cellnet(\"slide\"" in cell.source for cell in shown), "the heatmap was not displayed"
    tensorboard = next(cell for cell in nb.cells if "run_line_magic(\"tensorboard\"" in cell.source)
    assert "tensorboard --logdir" in "".join(out.get("text", "") for out in tensorboard.outputs)
