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
    os.environ.setdefault("MPLBACKEND", "Agg")
    start = time.time()
    try:
        pm.execute_notebook(str(notebook), str(output), parameters=parameters, kernel_name="python3",
                            cwd=str(cwd or REPO_ROOT), progress_bar=False, execution_timeout=timeout,
                            log_output=False)
    except PapermillExecutionError as e:
        cell, first_line = _failed_cell(output)
        raise NotebookFailed(notebook.name, cell, f"{e.ename}: {e.evalue} (in `{first_line}`)", output) from None
    except Exception as e:  # kernel death, timeout: still say which notebook
        raise NotebookFailed(notebook.name, None, f"{type(e).__name__}: {e}", output) from e
    finally:
        os.environ.clear()
        os.environ.update(old_env)
    return time.time() - start


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
