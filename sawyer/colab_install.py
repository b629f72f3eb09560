"""Install the course on Colab without breaking the kernel that is already running.

Colab imports numpy, pandas, torch (and more) before the first cell runs. If pip then replaces one of them,
the kernel holds half of the old module and half of the new one, and the next cell fails with errors such as
``'numpy.ufunc' object has no attribute '__qualname__'``. So each notebook's first code cell calls
``colab_install()``, which:

1. reads ``requirements-colab.txt``: only what the notebooks import and Colab lacks (transformers, peft,
   bitsandbytes, ...), pinned exactly as in ``requirements.txt``;
2. skips pip when every pin is already installed (the second notebook on one VM, or after a restart: instant);
3. otherwise runs pip with every *already imported* distribution held at its current version (a pip
   constraints file), so pip resolves around Colab's numpy/pandas/torch instead of replacing them;
4. only if pip cannot honour that hold (a pin that truly needs a newer numpy), installs without it and
   restarts the runtime from code, saying so in one line: re-run the notebook and step 2 makes it instant.

``requirements.txt`` stays the exact, tested set for a local machine and CI (``make install``).
"""
from __future__ import annotations

import importlib.metadata as md
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
RESTART_MESSAGE = ("Restarting the Colab runtime once so the new {pkgs} load cleanly: when it reconnects, run the "
                   "notebook again (Runtime > Run all); the install is then already done.")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: str | Path) -> dict[str, str]:
    """``{canonical name: version}`` from a requirements file of exact ``name==version`` pins.

    Anything else (a range, a URL) is an error naming the file and line: the Colab set must be exact.
    """
    pins = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)", line)
        if not m:
            raise ValueError(f"{path}:{n}: {line!r} is not an exact 'name==version' pin")
        pins[_canonical(m.group(1))] = m.group(2)
    return pins


def installed_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def unmet(pins: dict[str, str]) -> dict[str, str | None]:
    """The pins whose installed version differs: ``{name: installed version or None}``."""
    return {name: installed_version(name) for name, version in pins.items() if installed_version(name) != version}


def imported_distributions() -> dict[str, str]:
    """``{distribution: version}`` for every distribution with a module imported in this process."""
    top = {m.split(".", 1)[0] for m in list(sys.modules)}
    out = {}
    for module, dists in md.packages_distributions().items():
        if module in top:
            for dist in dists:
                version = installed_version(dist)
                if version:
                    out[_canonical(dist)] = version
    return out


def _pip(requirements: Path, constraints: dict[str, str] | None, quiet: bool) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-r", str(requirements)]
    if quiet:
        cmd.append("-q")
    with tempfile.TemporaryDirectory() as tmp:
        if constraints:
            hold = Path(tmp) / "hold.txt"
            hold.write_text("".join(f"{k}=={v}\n" for k, v in sorted(constraints.items())), encoding="utf-8")
            cmd += ["-c", str(hold)]
        return subprocess.run(cmd, capture_output=True, text=True)


def restart_runtime(message: str) -> None:
    """Print one line and end this kernel process; Colab starts a fresh one on its own (its documented way)."""
    print(message, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def colab_install(requirements: str | Path | None = None, *, quiet: bool = True, echo: Callable = print,
                  restart: Callable[[str], None] = restart_runtime) -> str:
    """Install ``requirements-colab.txt`` safely under a running kernel; returns what it did.

    ``"already installed"``: every pin was there, pip never ran. ``"installed"``: pip ran and kept every
    imported distribution at its version. ``"restarting"``: an imported distribution had to change, so
    ``restart`` was called (in a notebook it does not return). A pip failure raises with pip's last lines.
    """
    requirements = Path(requirements or REPO_ROOT / "requirements-colab.txt")
    pins = read_pins(requirements)
    if not unmet(pins):
        echo(f"course libraries already installed ({len(pins)} pinned packages)")
        return "already installed"
    before = imported_distributions()
    hold = {name: v for name, v in before.items() if name not in pins}  # never downgrade what we pin ourselves
    start = time.perf_counter()
    result = _pip(requirements, hold, quiet)
    held = result.returncode == 0
    if not held:  # the hold cannot be met: install anyway, then restart so the kernel loads one consistent set
        echo("pip cannot keep the preinstalled versions; installing the pinned set and restarting once")
        result = _pip(requirements, None, quiet)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"pip install -r {requirements} failed (exit {result.returncode}):\n{tail}")
    echo(f"installed {len(pins)} pinned packages in {time.perf_counter() - start:.0f} s")
    changed = sorted(name for name, v in before.items() if installed_version(name) != v)
    if changed:
        restart(RESTART_MESSAGE.format(pkgs=", ".join(changed)))
        return "restarting"
    return "installed"
