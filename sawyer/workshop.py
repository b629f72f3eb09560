"""Run the whole course: notebooks 01-06 in order, into one run folder, ending with a report.

    python -m sawyer.workshop --preset tiny                 # the offline dry run (`make workshop`)
    python -m sawyer.workshop --preset t4 --only 02,03 --run-dir runs/my-run
    python -m sawyer.workshop --preset t4 --run-dir runs/my-run --resume   # skip finished notebooks

Artifacts flow through the run folder (``runs/<name>``; the rules are in ``sawyer.runs``): each notebook
starts its stage (``runs.start_stage``: lock, DONE removed, fingerprint checked), writes into its own stage
folder (``02_sft/adapter``, ``03_reward_model/model``, ``04_ppo/adapter``, ...) and ends with ``finish``,
which writes ``metrics.json`` (with wall time and peak memory) and then the ``DONE`` marker; ``--resume``
skips a notebook whose stage is DONE, and a later notebook refuses to start without the stages it needs.
A failure stops the run with the notebook, the cell and the error, and a non-zero exit; what finished is kept.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from sawyer import runs
from sawyer.notebooks import NOTEBOOK_DIR, NotebookFailed, execute
from sawyer.runs import finish_stage, is_done, read_metrics, require_stages  # noqa: F401 (used by notebooks)

#: (number, notebook file stem, stage folder in the run folder, stages it needs)
COURSE = [
    ("01", "01_flan_t5_neutral_summaries", "01_summaries", ()),
    ("02", "02_sawyer_sft", "02_sft", ()),
    ("03", "03_sawyer_reward_model", "03_reward_model", ()),
    ("04", "04_sawyer_ppo", "04_ppo", ("02_sft", "03_reward_model")),
    ("05", "05_sawyer_evaluation", "05_evaluation", ("02_sft", "03_reward_model", "04_ppo")),
    ("06", "06_ppo_vs_dpo_vs_grpo", "06_preference", ("02_sft", "03_reward_model", "04_ppo")),
]


# --------------------------------------------------------------------------- used inside the notebooks
def resolve_run_dir(run_dir: str | os.PathLike | None, preset: str, *, use_drive: bool | str = "auto") -> Path:
    """The run folder: ``runs/<run_dir>`` (git-ignored), on Google Drive when on Colab; see ``sawyer.runs``."""
    return runs.resolve_run_dir(run_dir, preset, use_drive=use_drive)


def stage_dir(run_dir: Path, stage: str) -> Path:
    """``run_dir/stage``, created."""
    path = Path(run_dir) / stage
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------- the runner
def run(preset: str = "tiny", *, run_dir: str | None = None, only: list[str] | None = None, resume: bool = False,
        offline: bool | None = None, echo=print) -> Path:
    """Execute the course's notebooks in order and write ``report.md``; returns the run folder.

    ``resume=False`` runs every wanted notebook from scratch (each is told ``resume=False``, so old checkpoints
    are cleared); ``resume=True`` skips DONE stages and lets an interrupted stage continue from its checkpoint
    when its fingerprint still matches (``sawyer.runs.start_stage``). The runner locks the run folder, so a
    second runner on the same folder stops with ``runs.RunLocked`` instead of interleaving with this one.
    """
    offline = preset in ("tiny", "cpu") if offline is None else offline  # both run on local weights only
    run_path = resolve_run_dir(run_dir, preset, use_drive=False)
    wanted = [c for c in COURSE if not only or c[0] in only]
    unknown = set(only or []) - {c[0] for c in COURSE}
    if unknown:
        raise ValueError(f"unknown notebook number(s) {sorted(unknown)}; valid: {[c[0] for c in COURSE]}")
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "SAWYER_NETGUARD": "1"} if offline else {}
    env["TOKENIZERS_PARALLELISM"] = "false"
    runs.acquire_lock(run_path, "run folder")
    try:
        return _run_notebooks(run_path, preset, wanted, resume, env, echo)
    finally:
        runs.release_lock(run_path)


def _run_notebooks(run_path: Path, preset: str, wanted: list, resume: bool, env: dict, echo) -> Path:
    timings = _read_timings(run_path)
    echo(f"SAWYER workshop: preset={preset} run folder={run_path}")
    start = time.time()
    for i, (num, stem, stage, needs) in enumerate(wanted, 1):
        label = f"[{i}/{len(wanted)}] {stem}"
        stale = runs.stale_upstream(run_path, stage) if is_done(run_path, stage) else []
        if resume and is_done(run_path, stage) and not stale:
            echo(f"{label}: already complete, skipped (--resume)")
            continue
        if resume and stale:
            echo(f"{label}: finished, but built from an older {', '.join(stale)}: running it again")
        require_stages(run_path, *needs)
        (run_path / stage / "DONE").unlink(missing_ok=True)  # re-running: not finished until it says so again
        echo(f"{label}: running ...", end="", flush=True) if echo is print else echo(f"{label}: running ...")
        try:
            seconds = execute(NOTEBOOK_DIR / f"{stem}.ipynb", run_path / "notebooks" / f"{stem}.ipynb",
                              {"preset": preset, "run_dir": str(run_path), "resume": resume}, env=env)
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
    lines += ["| notebook | status | time (s) | stage wall time (s) | peak CPU RSS (GiB) | peak GPU reserved (GiB) |",
              "|---|---|---|---|---|---|"]
    for num, stem, stage, _ in COURSE:
        # "incomplete": the stage started (its folder exists) but never wrote DONE: killed, failed or running
        status = "done" if is_done(run_path, stage) else "incomplete" if (run_path / stage).is_dir() else "not run"
        m = read_metrics(run_path, stage) if status == "done" else {}
        cells = [_fmt(m[k]) if k in m else "" for k in ("wall_seconds", "peak_cpu_rss_gib", "peak_gpu_reserved_gib")]
        lines.append(f"| {stem} | {status} | {timings.get(stem, '') if status == 'done' else ''} | {' | '.join(cells)} |")
    for num, stem, stage, _ in COURSE:
        metrics = read_metrics(run_path, stage) if is_done(run_path, stage) else {}
        if not metrics:
            continue
        lines += ["", f"## {stem}", ""]
        for table in sorted((run_path / stage).glob("*.md")):  # tables a stage writes, e.g. 06's three_way.md
            lines += [f"**{table.stem.replace('_', ' ')}**", "", table.read_text().rstrip(), ""]
        lines += ["| metric | value |", "|---|---|"]
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
    parser = argparse.ArgumentParser(prog="python -m sawyer.workshop", description="Run notebooks 01-06 in order.")
    parser.add_argument("--preset", default="tiny", choices=["tiny", "cpu", "t4", "a100"])
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
