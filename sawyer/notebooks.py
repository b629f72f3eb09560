"""Notebook plumbing: jupytext pairs, the no-outputs rule, and executing a notebook with papermill.

The sources of the course are ``notebooks/NN_name.py`` files in jupytext's ``py:percent`` format (readable
diffs); the ``.ipynb`` files next to them are generated from them and committed **without outputs**, so Colab
badges open clean notebooks. ``python -m sawyer.notebooks sync`` regenerates them; ``check`` fails when a pair
is out of sync or a committed notebook carries outputs (CI runs it through the test suite).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import jupytext
import nbformat

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}


def sources(folder: Path = NOTEBOOK_DIR) -> list[Path]:
    """The jupytext sources ``NN_*.py``, in course order."""
    return sorted(p for p in folder.glob("[0-9][0-9]_*.py"))


def to_notebook(source: Path) -> nbformat.NotebookNode:
    """The clean ``.ipynb`` for a ``py:percent`` source: no outputs, no execution counts, python3 kernel."""
    nb = jupytext.read(source, fmt="py:percent")
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata.setdefault("jupytext", {})["formats"] = "ipynb,py:percent"
    nb.metadata["jupytext"].pop("text_representation", None)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell["id"] = f"cell-{i:02d}"  # deterministic ids keep regenerated notebooks byte-identical
    nb.nbformat, nb.nbformat_minor = 4, 5
    return nb


def _normalise(nb: nbformat.NotebookNode) -> list[tuple[str, str, tuple]]:
    return [(c.cell_type, c.source.strip(), tuple(sorted(c.get("metadata", {}).get("tags", []))))
            for c in nb.cells]


def sync(folder: Path = NOTEBOOK_DIR) -> list[Path]:
    """Write ``NN_name.ipynb`` from every ``NN_name.py``; returns the files written."""
    written = []
    for src in sources(folder):
        target = src.with_suffix(".ipynb")
        nbformat.write(to_notebook(src), target)
        written.append(target)
    return written


def check(folder: Path = NOTEBOOK_DIR) -> list[str]:
    """Problems with the committed notebooks (empty list: all good).

    - every source has its ``.ipynb`` and every ``.ipynb`` its source;
    - the ``.ipynb`` cells equal the source's cells (type, text, tags);
    - no code cell carries outputs or an execution count.
    """
    problems = []
    srcs = {p.stem: p for p in sources(folder)}
    nbs = {p.stem: p for p in folder.glob("[0-9][0-9]_*.ipynb")}
    for stem in sorted(set(srcs) - set(nbs)):
        problems.append(f"notebooks/{stem}.ipynb is missing: run `make notebooks`")
    for stem in sorted(set(nbs) - set(srcs)):
        problems.append(f"notebooks/{stem}.ipynb has no jupytext source notebooks/{stem}.py")
    for stem in sorted(set(srcs) & set(nbs)):
        committed = nbformat.read(nbs[stem], as_version=4)
        for i, cell in enumerate(committed.cells):
            if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None):
                problems.append(f"notebooks/{stem}.ipynb cell {i} carries outputs: commit notebooks without outputs "
                                "(run `make notebooks`)")
                break
        if _normalise(committed) != _normalise(to_notebook(srcs[stem])):
            problems.append(f"notebooks/{stem}.ipynb is out of sync with notebooks/{stem}.py: run `make notebooks`")
    return problems


# --------------------------------------------------------------------------- execution
@dataclass
class NotebookFailed(RuntimeError):
    """A notebook stopped on an error: which notebook, which cell, what error, where the partial output is."""

    notebook: str
    cell: int | None
    error: str
    output: Path

    def __str__(self) -> str:
        where = f"cell {self.cell}" if self.cell is not None else "start-up"
        return f"{self.notebook} failed at {where}: {self.error}\n  executed copy with the traceback: {self.output}"


def execute(notebook: Path, output: Path, parameters: dict, *, cwd: Path | None = None,
            timeout: int | None = 1800, env: dict | None = None) -> float:
    """Run ``notebook`` with papermill, injecting ``parameters``; returns the seconds it took.

    The notebook's ``parameters`` cell holds the defaults; papermill adds a cell after it with ours.
    The executed copy (with outputs) goes to ``output`` even when a cell fails; a failure raises
    ``NotebookFailed`` naming the notebook, the cell and the error.
    """
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    output.parent.mkdir(parents=True, exist_ok=True)
    old_env = dict(os.environ)
    os.environ.update({k: str(v) for k, v in (env or {}).items()})
    if os.environ.get("SAWYER_NETGUARD") == "1":  # the kernel is guarded from its first cell (sawyer.netguard)
        from sawyer import netguard

        os.environ.update(netguard.child_environment())
    # Jupyter's inline backend, as on Colab: figures are saved into the executed notebook (Agg would save none)
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    start = time.time()
    try:
        with tempfile.TemporaryDirectory(prefix="sawyer-kernel-") as sockets:
            pm.execute_notebook(str(notebook), str(output), parameters=parameters, kernel_name="python3",
                                cwd=str(cwd or REPO_ROOT), progress_bar=False, execution_timeout=timeout,
                                log_output=False, kernel_manager_class=_ipc_kernel_manager(Path(sockets)),
                                extra_arguments=[f"--IPKernelApp.exec_lines={KERNEL_SETUP}"],
                                coalesce_streams=True)
    except PapermillExecutionError as e:
        cell, first_line = _failed_cell(output)
        raise NotebookFailed(notebook.name, cell, f"{e.ename}: {e.evalue} (in `{first_line}`)", output) from None
    except Exception as e:  # kernel death, timeout: still say which notebook
        raise NotebookFailed(notebook.name, None, f"{type(e).__name__}: {e}", output) from e
    finally:
        os.environ.clear()
        os.environ.update(old_env)
    return time.time() - start


#: Run in every executed kernel before the first cell (papermill runs only; Colab is untouched).
KERNEL_SETUP = "import sawyer.notebooks as _sawyer_nb; _sawyer_nb.kernel_setup(); del _sawyer_nb"


def kernel_setup() -> None:
    """Text progress bars in executed notebooks: ``tqdm.auto`` picks ipywidget bars inside a kernel, and a
    saved notebook holds no widget state, so every bar would render as "0%". Text bars save their last state
    (``coalesce_streams`` applies the carriage returns)."""
    import tqdm.auto
    import tqdm.autonotebook
    import tqdm.std

    for module in (tqdm.auto, tqdm.autonotebook):
        module.tqdm, module.trange = tqdm.std.tqdm, tqdm.std.trange


def _ipc_kernel_manager(folder: Path):
    """A kernel manager that talks to the kernel over Unix sockets in ``folder`` instead of TCP on loopback:
    nothing listens on a port, and ipykernel's "Kernel is running over TCP without encryption" warning
    (printed once per notebook) does not apply."""
    from jupyter_client import AsyncKernelManager

    class IPCKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            super().__init__(transport="ipc", ip=str(folder / "kernel"), **kwargs)

    return IPCKernelManager


#: ``sawyer.plots`` functions that draw one figure per call (``redraw_run`` saves files and displays nothing).
FIGURE_CALLS = ("training_curves", "reward_boxplot", "reward_histograms", "margin_histogram", "length_scatter",
                "spotcheck_bar", "accuracy_bars", "word_shift_bars")
#: Text that must not appear in an executed notebook's outputs, and why.
NOISE = {"FutureWarning": "a deprecation warning", "over TCP without encryption": "kernel transport noise",
         "Token indices sequence length": "a tokenizer length warning", "\x1b[": "raw ANSI escape codes",
         "<torch._C.Generator": "a stray return value", "<Figure size": "a figure shown as text, not as an image"}


def output_problems(executed: Path) -> list[str]:
    """What is wrong with the outputs of an executed notebook (empty list: nothing).

    - every code cell shows exactly as many images as it has figure calls (``plots.<name>(`` in its source,
      counted once even inside a loop: a live plot replaces itself); no duplicates, no stale copies, none missing;
    - no ``NOISE`` text in any output, and no ipywidget progress bar (saved without its state it renders "0%").
    """
    nb = nbformat.read(executed, as_version=4)
    problems, name = [], Path(executed).name
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        outputs = cell.get("outputs", [])
        images = sum("image/png" in o.get("data", {}) for o in outputs)
        expected = sum(cell.source.count(f"plots.{f}(") for f in FIGURE_CALLS)
        if images != expected:
            problems.append(f"{name} cell {i}: {images} image(s) for {expected} figure call(s)")
        for o in outputs:
            data = o.get("data", {})
            if "application/vnd.jupyter.widget-view+json" in data:
                problems.append(f"{name} cell {i}: an ipywidget progress bar ({str(data.get('text/plain'))[:40]!r})")
            plain = "" if "image/png" in data else str(data.get("text/plain", ""))  # an image's text twin is fine
            text = o.get("text", "") + plain + "".join(o.get("traceback", []))
            problems += [f"{name} cell {i}: {why} ({needle!r})" for needle, why in NOISE.items() if needle in text]
    return problems


def _failed_cell(executed: Path) -> tuple[int | None, str]:
    """The failing cell's 0-based index in the *user's* notebook (papermill's own cells not counted)
    and its first line of code, read from the executed copy."""
    try:
        nb = nbformat.read(executed, as_version=4)
    except Exception:  # the executed copy may be unreadable after a crash
        return None, "?"
    own = [c for c in nb.cells if not {"injected-parameters", "papermill-error-cell-tag"}
           & set(c.get("metadata", {}).get("tags", []))]
    for i, cell in enumerate(own):
        if any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
            return i, cell.source.strip().splitlines()[0] if cell.source.strip() else ""
    return None, "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sawyer.notebooks", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["sync", "check"])
    args = parser.parse_args(argv)
    if args.command == "sync":
        for p in sync():
            print(f"wrote {p.relative_to(REPO_ROOT)}")
        return 0
    problems = check()
    for p in problems:
        print(p, file=sys.stderr)
    print("notebooks: OK" if not problems else f"notebooks: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
