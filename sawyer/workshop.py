"""Run the whole course: notebooks 01-05 in order, into one run folder, ending with a report.

    python -m sawyer.workshop --preset tiny                 # the offline dry run (`make workshop`)
    python -m sawyer.workshop --preset t4 --only 02,03 --run-dir runs/my-run
    python -m sawyer.workshop --preset t4 --run-dir runs/my-run --resume   # skip finished notebooks

Artifacts flow through the run folder: each notebook writes into its own stage folder
(``02_sft/adapter``, ``03_reward_model/model``, ``04_ppo/adapter``, ...) and ends by calling
``finish_stage``, which writes ``metrics.json`` and a ``DONE`` marker; ``--resume`` skips a notebook whose
stage is DONE, and a later notebook refuses to start without the stages it needs. A failure stops the run
with the notebook, the cell and the error, and a non-zero exit; what finished is kept.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from sawyer.notebooks import NOTEBOOK_DIR, REPO_ROOT, NotebookFailed, execute

#: (number, notebook file stem, stage folder in the run folder, stages it needs)
COURSE = [
    ("01", "01_flan_t5_neutral_summaries", "01_summaries", ()),
    ("02", "02_sawyer_sft", "02_sft", ()),
    ("03", "03_sawyer_reward_model", "03_reward_model", ()),
    ("04", "04_sawyer_ppo", "04_ppo", ("02_sft", "03_reward_model")),
    ("05", "05_sawyer_evaluation", "05_evaluation", ("02_sft", "03_reward_model", "04_ppo")),
]


# --------------------------------------------------------------------------- used inside the notebooks
def resolve_run_dir(run_dir: str | os.PathLike | None, preset: str, *, use_drive: bool = False) -> Path:
    """The run folder: ``run_dir`` if given, else ``runs/<preset>-<time>``; on Google Drive if ``use_drive``.

    On Colab, ``use_drive=True`` mounts Drive and puts the folder under ``MyDrive/sawyer/`` so a disconnect
    loses nothing: re-open the notebook with the same ``run_dir`` and the finished stages are still there.
    """
    base = REPO_ROOT / "runs"
    if use_drive:
        try:
            from google.colab import drive  # type: ignore[import-not-found]
        except ImportError:
            raise RuntimeError("use_drive=True works on Colab only; on other machines pass a run_dir") from None
        drive.mount("/content/drive")
        base = Path("/content/drive/MyDrive/sawyer")
    if run_dir:
        path = Path(run_dir)
        path = path if path.is_absolute() else (base / path if use_drive else REPO_ROOT / path)
    else:
        path = base / f"{preset}-{datetime.now():%Y%m%d-%H%M%S}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def stage_dir(run_dir: Path, stage: str) -> Path:
    """``run_dir/stage``, created."""
    path = Path(run_dir) / stage
    path.mkdir(parents=True, exist_ok=True)
    return path


def require_stages(run_dir: Path, *stages: str) -> None:
    """Raise a clear error when an earlier notebook's artifacts are missing from ``run_dir``."""
    missing = [s for s in stages if not is_done(run_dir, s)]
    if missing:
        names = {stage: f"{num}_{stem.split('_', 1)[1]}" for num, stem, stage, _ in COURSE}
        raise RuntimeError(
            f"run folder {run_dir} lacks the finished stage(s) {', '.join(missing)}: run notebook(s) "
            f"{', '.join(names.get(s, s) for s in missing)} first with the same run_dir "
            "(or `python -m sawyer.workshop --run-dir ... --only ...`)")


def finish_stage(run_dir: Path, stage: str, metrics: dict) -> Path:
    """Write ``metrics.json`` (atomically) and the ``DONE`` marker for ``stage``; returns the metrics file."""
    folder = stage_dir(run_dir, stage)
    tmp = folder / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2, default=_jsonable))
    tmp.replace(folder / "metrics.json")
    (folder / "DONE").write_text(datetime.now().isoformat())
    return folder / "metrics.json"


def is_done(run_dir: Path, stage: str) -> bool:
    return (Path(run_dir) / stage / "DONE").exists()


def read_metrics(run_dir: Path, stage: str) -> dict:
    path = Path(run_dir) / stage / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _jsonable(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


# --------------------------------------------------------------------------- the runner
def run(preset: str = "tiny", *, run_dir: str | None = None, only: list[str] | None = None, resume: bool = False,
        offline: bool | None = None, echo=print) -> Path:
    """Execute the course's notebooks in order and write ``report.md``; returns the run folder."""
    offline = preset == "tiny" if offline is None else offline
    run_path = resolve_run_dir(run_dir, preset)
    wanted = [c for c in COURSE if not only or c[0] in only]
    unknown = set(only or []) - {c[0] for c in COURSE}
    if unknown:
        raise ValueError(f"unknown notebook number(s) {sorted(unknown)}; valid: {[c[0] for c in COURSE]}")
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "SAWYER_NETGUARD": "1"} if offline else {}
    env["TOKENIZERS_PARALLELISM"] = "false"
    timings = _read_timings(run_path)
    echo(f"SAWYER workshop: preset={preset} run folder={run_path}")
    start = time.time()
    for i, (num, stem, stage, needs) in enumerate(wanted, 1):
        label = f"[{i}/{len(wanted)}] {stem}"
        if resume and is_done(run_path, stage):
            echo(f"{label}: already complete, skipped (--resume)")
            continue
        require_stages(run_path, *needs)
        echo(f"{label}: running ...", end="", flush=True) if echo is print else echo(f"{label}: running ...")
        try:
            seconds = execute(NOTEBOOK_DIR / f"{stem}.ipynb", run_path / "notebooks" / f"{stem}.ipynb",
                              {"preset": preset, "run_dir": str(run_path)}, env=env)
        except NotebookFailed as e:
            echo(f" FAILED\n{e}")
            _write_report(run_path, preset, timings)
            raise
        timings[stem] = round(seconds, 1)
        _save_timings(run_path, timings)
        echo(f" done in {seconds:.0f} s")
    report = _write_report(run_path, preset, timings)
    echo(f"finished in {time.time() - start:.0f} s; report: {report}")
    return run_path


def _read_timings(run_path: Path) -> dict:
    path = run_path / "timings.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _save_timings(run_path: Path, timings: dict) -> None:
    (run_path / "timings.json").write_text(json.dumps(timings, indent=2))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-3 and v != 0 else f"{v:.4f}".rstrip("0").rstrip(".")
    return str(v)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif not isinstance(v, list):
            out[key] = v
    return out


def _write_report(run_path: Path, preset: str, timings: dict) -> Path:
    """``report.md``: every stage's metrics, time per notebook, figures and the executed notebooks."""
    lines = [f"# SAWYER workshop run: `{run_path.name}`", "", f"Preset: `{preset}`. Written {datetime.now():%Y-%m-%d %H:%M}.", ""]
    lines += ["| notebook | status | time (s) |", "|---|---|---|"]
    for num, stem, stage, _ in COURSE:
        status = "done" if is_done(run_path, stage) else "not run"
        lines.append(f"| {stem} | {status} | {timings.get(stem, '')} |")
    for num, stem, stage, _ in COURSE:
        metrics = read_metrics(run_path, stage)
        if not metrics:
            continue
        lines += ["", f"## {stem}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in _flatten(metrics).items()]
        for fig in sorted((run_path / stage).glob("*.png")):
            lines += ["", f"![{fig.stem}]({fig.relative_to(run_path).as_posix()})"]
    executed = sorted((run_path / "notebooks").glob("*.ipynb"))
    if executed:
        lines += ["", "## Executed notebooks", ""] + [f"- `{p.relative_to(run_path).as_posix()}`" for p in executed]
    path = run_path / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sawyer.workshop", description="Run notebooks 01-05 in order.")
    parser.add_argument("--preset", default="tiny", choices=["tiny", "t4", "a100"])
    parser.add_argument("--only", default="", help="comma-separated notebook numbers, e.g. 02,03")
    parser.add_argument("--run-dir", default=None, help="run folder (default runs/<preset>-<time>)")
    parser.add_argument("--resume", action="store_true", help="skip notebooks whose stage is complete")
    args = parser.parse_args(argv)
    only = [s.strip().zfill(2) for s in args.only.split(",") if s.strip()] or None
    try:
        run(args.preset, run_dir=args.run_dir, only=only, resume=args.resume)
    except (NotebookFailed, RuntimeError, ValueError) as e:
        print(f"\nworkshop stopped: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
