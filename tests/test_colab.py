"""The Colab install, emulated: Colab's numpy/pandas already imported, then the notebooks' install cell.

What Colab gives a notebook before its first cell (late 2026): Python 3.13, torch 2.11+cu128, numpy 2.1.3 and
pandas 2.2.3 already imported, scipy/matplotlib/IPython/tqdm preinstalled. We emulate it with a venv holding
numpy 2.1.3 and pandas 2.2.3 (plus scipy, matplotlib, IPython, tqdm) on **this machine's Python 3.11 and its
torch 2.13 CPU wheel** (no Python 3.13 torch wheel is available offline here; the install set does not
contain torch, so the torch version only matters as "already there").

The venv is built once (it needs PyPI) under ``$SAWYER_COLAB_VENV`` or ``~/.cache/sawyer/colab-venv-<hash>``
(the hash covers the preinstalled set), outside the repository so CI's fresh clones reuse it. The first run
on a fresh venv performs the whole install; a changed ``requirements-colab.txt`` installs the difference on
the next run (as on a VM that ran an older notebook); otherwise runs check the "already installed" path,
which every notebook after the first takes on one VM. Delete the folder to test a fresh install again.

Unit tests of ``sawyer.colab_install`` (pin parsing, the hold, the restart decision) run without the venv.
"""
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sawyer import colab_install

REPO = Path(__file__).resolve().parent.parent
COLAB_PREINSTALLED = ["numpy==2.1.3", "pandas==2.2.3", "scipy==1.14.1", "matplotlib==3.10.0", "ipython==8.30.0",
                      "tqdm==4.67.1", "torch==2.13.0"]


# --------------------------------------------------------------------------- unit tests (no venv)
def test_read_pins_accepts_exact_pins_and_names_a_bad_line(tmp_path):
    f = tmp_path / "req.txt"
    f.write_text("# comment\nPeft==0.21.2  # why\nhuggingface_hub==2.4.0\n\n", encoding="utf-8")
    assert colab_install.read_pins(f) == {"peft": "0.21.2", "huggingface-hub": "2.4.0"}
    f.write_text("peft==0.21.2\ntorch>=2.6\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"req.txt:2: 'torch>=2.6' is not an exact"):
        colab_install.read_pins(f)


def test_colab_requirements_are_exact_pins_that_match_requirements_txt_and_leave_colab_alone():
    colab = colab_install.read_pins(REPO / "requirements-colab.txt")
    full = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==")
            full[colab_install._canonical(name)] = version
    assert {k: full.get(k) for k in colab} == colab  # same versions as the tested set
    assert not set(colab) & {"numpy", "pandas", "torch", "scipy", "matplotlib", "ipython", "tqdm", "pyarrow"}


def test_nothing_to_do_when_every_pin_is_installed(tmp_path, monkeypatch):
    f = tmp_path / "req.txt"
    f.write_text("pytest==%s\n" % colab_install.installed_version("pytest"), encoding="utf-8")
    monkeypatch.setattr(colab_install, "_pip", lambda *a, **k: pytest.fail("pip must not run"))
    assert colab_install.colab_install(f, echo=lambda *a: None) == "already installed"


def test_pip_holds_imported_distributions_and_restarts_only_if_one_changed(tmp_path, monkeypatch):
    f = tmp_path / "req.txt"
    f.write_text("not-installed-pkg==1.0\n", encoding="utf-8")
    calls = []

    def fake_pip(requirements, constraints, quiet):
        calls.append(constraints)
        return subprocess.CompletedProcess([], 0 if constraints is not None or len(calls) > 1 else 1, "", "")

    monkeypatch.setattr(colab_install, "_pip", fake_pip)
    versions = {"numpy": "2.1.3"}
    monkeypatch.setattr(colab_install, "imported_distributions", lambda: dict(versions))
    monkeypatch.setattr(colab_install, "installed_version", lambda name: versions.get(name))
    restarts = []
    # 1. pip honours the hold: installed, no restart, numpy was held at its version
    assert colab_install.colab_install(f, echo=lambda *a: None, restart=restarts.append) == "installed"
    assert calls == [{"numpy": "2.1.3"}] and restarts == []

    # 2. pip cannot honour the hold: second pip call without it; numpy changed -> one restart, message says why
    def failing_then_upgrading(requirements, constraints, quiet):
        calls.append(constraints)
        if constraints:
            return subprocess.CompletedProcess([], 1, "", "ResolutionImpossible")
        versions["numpy"] = "2.4.6"
        return subprocess.CompletedProcess([], 0, "", "")

    calls.clear()
    monkeypatch.setattr(colab_install, "_pip", failing_then_upgrading)
    assert colab_install.colab_install(f, echo=lambda *a: None, restart=restarts.append) == "restarting"
    assert calls == [{"numpy": "2.1.3"}, None]
    assert len(restarts) == 1 and "numpy" in restarts[0] and "run the notebook again" in restarts[0]


def test_pip_failure_raises_with_pips_words(tmp_path, monkeypatch):
    f = tmp_path / "req.txt"
    f.write_text("not-installed-pkg==1.0\n", encoding="utf-8")
    monkeypatch.setattr(colab_install, "_pip",
                        lambda *a: subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution"))
    with pytest.raises(RuntimeError, match="No matching distribution"):
        colab_install.colab_install(f, echo=lambda *a: None)


# --------------------------------------------------------------------------- the emulated Colab venv
def _venv_dir() -> Path:
    key = hashlib.sha256("\n".join(COLAB_PREINSTALLED).encode())  # Colab's side only: our pins install in the test
    default = Path.home() / ".cache" / "sawyer" / f"colab-venv-{key.hexdigest()[:12]}"
    return Path(os.environ.get("SAWYER_COLAB_VENV", default))


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAWYER_NETGUARD", "PYTHONPATH", "VIRTUAL_ENV"))}
    env.pop("PIP_REQUIRE_VIRTUALENV", None)
    return env


def _colab_python() -> Path:
    venv = _venv_dir()
    python = venv / "bin" / "python"
    if not (venv / ".preinstalled").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        r = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                            *COLAB_PREINSTALLED], env=_clean_env(), capture_output=True, text=True)
        assert r.returncode == 0, f"building the emulated Colab venv {venv} failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}"
        (venv / ".preinstalled").write_text("\n".join(COLAB_PREINSTALLED) + "\n")
    return python


CELL = textwrap.dedent("""
    import json, sys
    import numpy, pandas, torch            # Colab imported these before the first cell
    before = {"numpy": numpy.__version__, "pandas": pandas.__version__, "torch": torch.__version__}
    sys.path.insert(0, REPO)               # the Colab cell does this after cloning the course
    from sawyer.colab_install import colab_install

    def restart(message):                  # Colab's restart ends the kernel; here: end the process
        print(json.dumps({"status": "restarting", "message": message}))
        sys.exit(3)

    status = colab_install(REPO + "/requirements-colab.txt", restart=restart, echo=lambda m: print(m, file=sys.stderr))
    imports = [line for nb in sorted(__import__("pathlib").Path(REPO, "notebooks").glob("0*.py"))
               for line in nb.read_text().splitlines() if line.startswith(("import ", "from "))]
    for line in imports:
        exec(line)                         # every notebook's top-level import, in this kernel
    import importlib.metadata as md
    from sawyer.colab_install import read_pins
    wrong = {k: md.version(k) for k, v in read_pins(REPO + "/requirements-colab.txt").items() if md.version(k) != v}
    assert not wrong, wrong                # every pin installed at its version (trl: imported lazily by 06)
    import trl, peft, bitsandbytes         # noqa: F401  (the lazily imported ones load too)
    import numpy as np2, pandas as pd2
    after = {"numpy": np2.__version__, "pandas": pd2.__version__, "torch": torch.__version__}
    print(json.dumps({"status": status, "before": before, "after": after, "n_imports": len(imports),
                      "same_numpy_module": np2 is numpy}))
""")


def _run_cell(python: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-c", f"REPO = {str(REPO)!r}\n" + CELL], env=_clean_env(),
                          capture_output=True, text=True, timeout=900, cwd="/")


@pytest.mark.timeout(1500)
def test_colab_install_in_a_running_kernel_keeps_colabs_numpy_and_pandas_and_the_notebooks_import():
    python = _colab_python()
    r = _run_cell(python)
    if r.returncode == 3:  # the cell restarted the runtime: a fresh process must find everything installed
        r = _run_cell(python)
        assert json.loads(r.stdout.splitlines()[-1])["status"] == "already installed", r.stderr[-3000:]
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["status"] in {"installed", "already installed"}
    assert out["before"] == out["after"] and out["after"]["numpy"] == "2.1.3" and out["after"]["pandas"] == "2.2.3"
    assert out["same_numpy_module"] and out["n_imports"] > 20
