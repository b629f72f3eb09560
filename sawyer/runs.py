"""Run folders you can trust: where they live, stages, DONE markers, fingerprints, locks, safe checkpoints.

Artifacts flow 01 -> 05 through one run folder, one sub-folder per stage (``02_sft``, ``04_ppo``, ...), and a
Colab user re-runs notebooks after every disconnect. The rules, all here so they live in one place:

1. **Where.** ``resolve_run_dir("workshop")`` is ``runs/workshop`` in the repository (git-ignored); on Colab
   (``use_drive="auto"``) it is ``MyDrive/sawyer/runs/workshop`` on Google Drive, so it survives the runtime.
2. **A stage starts** with ``start_stage(run, "04_ppo", settings=cfg, needs=("02_sft", "03_reward_model"))``:
   it takes the stage's lock (two runs on one stage would interleave their logs), checks that the stages it
   needs are DONE, and *removes its own DONE* (a killed re-run must never look finished).
3. **Fingerprint.** The stage records what it is built from in ``fingerprint.json``: its own settings and the
   id of each upstream stage's finished output (a new id every time that stage finishes). A checkpoint is
   resumed only when the fingerprint is unchanged; otherwise the stage folder is cleared and the stage starts
   fresh, with a printed line that names what changed (``upstream 02_sft was re-run``; ``settings.kl_coef``).
4. **A stage ends** with ``stage.finish(metrics)``: ``metrics.json`` (plus wall time and peak memory), then
   ``DONE``, last. ``--resume`` in the runner skips only DONE stages that are still current: a DONE 04 whose
   02 was re-run since is stale (``stale_upstream``), and ``require_stages`` refuses it too.
5. **Checkpoints** are folders written all-or-nothing (``atomic_folder``): into a temporary folder, then
   swapped in with two renames; a crash between them leaves ``.checkpoint-old``, which ``recover`` puts back.
6. **Damaged files** (truncated by a crash, a full Drive) raise ``DamagedFile`` naming the file and the fix
   ("delete X or set resume=False"); a full disk raises ``DiskFull``; a torn last line of a JSON Lines log
   (the process died mid-write) is dropped with a warning.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import socket
import sys
import time
import uuid
import warnings
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

REPO_ROOT = Path(__file__).resolve().parent.parent
DRIVE_ROOT = Path("/content/drive/MyDrive/sawyer")
_IMPORTED = time.time()  # a notebook's start, near enough, for stages finished without start_stage


class RunLocked(RuntimeError):
    """Another live process holds this run folder or stage."""


class DamagedFile(RuntimeError):
    """A file in the run folder is truncated or corrupt (the message names it and says what to delete)."""


class DiskFull(OSError):
    """The disk (or Drive) ran out of space while writing into the run folder."""


# --------------------------------------------------------------------------- 1. where the run folder lives
def in_colab() -> bool:
    return "google.colab" in sys.modules


def resolve_run_dir(run_dir: str | os.PathLike | None = "workshop", preset: str = "run", *,
                    use_drive: bool | str = "auto") -> Path:
    """The run folder, created: an absolute path as given; a name (or relative path) under ``runs/``.

    ``"workshop"`` and ``"runs/workshop"`` both mean ``<repo>/runs/workshop`` (git-ignored), so the paths the
    README shows (``--adapter runs/workshop/04_ppo/adapter``) are right. ``None`` gives a fresh
    ``runs/<preset>-<time>``. ``use_drive``: ``"auto"`` (default) = Google Drive when running on Colab, so the
    folder outlives the runtime (Drive is mounted, with one printed line); ``True`` insists on Drive; ``False``
    keeps it local.
    """
    drive = in_colab() if use_drive == "auto" else bool(use_drive)
    base = REPO_ROOT / "runs"
    if drive:
        try:
            from google.colab import drive as colab_drive  # type: ignore[import-not-found]
        except ImportError:
            raise RuntimeError("use_drive=True works on Colab only; on other machines pass use_drive=False") from None
        if not Path("/content/drive/MyDrive").is_dir():
            colab_drive.mount("/content/drive")
        base = DRIVE_ROOT / "runs"
    name = Path(run_dir) if run_dir else Path(f"{preset}-{datetime.now():%Y%m%d-%H%M%S}")
    if not name.is_absolute() and name.parts[:1] == ("runs",):
        name = Path(*name.parts[1:])
    path = name if name.is_absolute() else base / name
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"run folder {path} is a file: pass another run_dir or remove the file")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except PermissionError:
        raise PermissionError(f"cannot create the run folder {path} (permission denied): pass a run_dir you "
                              "can write to") from None
    if not os.access(path, os.W_OK):
        raise PermissionError(f"run folder {path} is read-only: pass a run_dir you can write to")
    if drive:
        print(f"run folder on Google Drive (survives a disconnect): {path}")
    return path


# --------------------------------------------------------------------------- 2. locks
_held: dict[Path, Any] = {}  # lock file -> open file object, for the locks this process holds


def acquire_lock(folder: Path, what: str) -> Path:
    """Take an exclusive lock on ``folder/.lock`` (released by ``release_lock`` or when the process dies).

    ``flock`` locks vanish with their process, so a kill never leaves a stale lock. The same process may take
    a lock it already holds (a notebook's set-up cell run twice). Raises ``RunLocked`` naming the holder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = (folder / ".lock").resolve()
    if path in _held:
        return path
    try:
        import fcntl
    except ImportError:  # Windows: no flock; run without a lock rather than refuse to run
        return path
    f = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # a filesystem without locks
            warnings.warn(f"cannot lock {path} ({e}); continuing without a lock: run one notebook at a time")
            f.close()
            return path
        f.seek(0)
        holder = f.read().strip() or "unknown process"
        f.close()
        raise RunLocked(f"{what} {folder} is in use by another run ({holder}). Two runs on one folder would "
                        "overwrite each other's checkpoints and interleave their logs: wait for that run to end "
                        "or stop it (a notebook that stopped with an error keeps its lock until its kernel is "
                        "restarted), or use another run_dir.") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {datetime.now():%Y-%m-%d %H:%M:%S}, "
            f"{' '.join(sys.argv[:2])[:120]}")
    f.flush()
    _held[path] = f
    return path


def release_lock(folder: Path) -> None:
    f = _held.pop((Path(folder) / ".lock").resolve(), None)
    if f is not None:
        f.close()


# --------------------------------------------------------------------------- 3. stages, DONE, fingerprints
def is_done(run: Path, stage: str) -> bool:
    return (Path(run) / stage / "DONE").exists()


def done_id(run: Path, stage: str) -> str | None:
    """The id of a finished stage's output (new every time it finishes); None when it is not DONE."""
    path = Path(run) / stage / "DONE"
    if not path.exists():
        return None
    text = path.read_text(encoding="utf-8").strip()
    try:
        return json.loads(text)["id"]
    except (ValueError, KeyError, TypeError):
        return text  # a DONE written before fingerprints existed: its timestamp is its identity


def stale_upstream(run: Path, stage: str) -> list[str]:
    """The upstream stages re-run since ``stage`` was built from them (empty: it is current).

    Read from ``stage/fingerprint.json``: the output ids of its upstream stages when it started, compared with
    their DONE markers now. A DONE 04 whose 02 was re-trained since is stale: its results are of the old 02.
    """
    path = Path(run) / stage / "fingerprint.json"
    if not path.exists():
        return []
    upstream = read_json(path, f"delete {path}").get("upstream", {})
    return [s for s, built_from in upstream.items() if done_id(run, s) != built_from]


def require_stages(run: Path, *stages: str) -> None:
    """Raise a clear error when an earlier notebook's stage is not finished in ``run``, or is stale."""
    missing = [s for s in stages if not is_done(run, s)]
    stale = {s: stale_upstream(run, s) for s in stages if s not in missing}
    stale = {s: up for s, up in stale.items() if up}
    if stale:
        raise RuntimeError("; ".join(
            f"stage {s} in {run} was built from an older {', '.join(up)} (re-run since): re-run notebook "
            f"{s.split('_')[0]} first" for s, up in stale.items()))
    if missing:
        raise RuntimeError(
            f"run folder {run} lacks the finished stage(s) {', '.join(missing)}: run notebook(s) "
            f"{', '.join(s.split('_')[0] for s in missing)} first with the same run_dir (or `python -m "
            "sawyer.workshop --run-dir ... --only ...`); a stage whose re-run was interrupted is not finished")


def jsonable(x: Any) -> Any:
    """Settings as plain JSON: dataclasses as dicts, paths and other objects as strings."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        x = dataclasses.asdict(x)
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


def _flat(d: Any, prefix: str) -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}"))
    return out


def fingerprint_changes(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two fingerprints (empty when they match)."""
    changes = []
    for stage in sorted(set(old.get("upstream", {})) | set(new.get("upstream", {}))):
        if old.get("upstream", {}).get(stage) != new.get("upstream", {}).get(stage):
            changes.append(f"upstream stage {stage} was re-run since (its output id "
                           f"{old.get('upstream', {}).get(stage)} -> {new.get('upstream', {}).get(stage)})")
    a, b = _flat(old.get("settings"), "settings"), _flat(new.get("settings"), "settings")
    changes += [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)]
    return changes


def _peak_memory() -> dict[str, float]:
    """Peak memory of this process so far: CPU resident set (``ru_maxrss``) and CUDA memory reserved."""
    out = {}
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["peak_cpu_rss_gib"] = rss / 2**30 if sys.platform == "darwin" else rss / 2**20  # bytes vs KiB
    except ImportError:
        pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        out["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return out


@dataclasses.dataclass
class Stage:
    """A stage in progress (from ``start_stage``): its folder, whether it may resume, and ``finish``."""

    run: Path
    name: str
    folder: Path
    fingerprint: dict
    resume: bool            # True: a matching checkpoint in this folder may be resumed
    started: float

    def finish(self, metrics: dict, *, echo=print) -> Path:
        """Write ``metrics.json`` (with ``wall_seconds`` and peak memory), then ``DONE``; release the lock."""
        metrics = {**metrics, "wall_seconds": round(time.time() - self.started, 1), **_peak_memory()}
        write_json(self.folder / "metrics.json", metrics)
        done = {"id": uuid.uuid4().hex[:12], "finished": datetime.now().isoformat(timespec="seconds"),
                "fingerprint": self.fingerprint["hash"]}
        write_json(self.folder / "DONE", done)
        _started.pop(self.folder.resolve(), None)
        release_lock(self.folder)
        mem = ", ".join(f"{k.removeprefix('peak_').removesuffix('_gib').replace('_', ' ')} {v:.2f} GiB"
                        for k, v in _peak_memory().items())
        echo(f"{self.name} done in {metrics['wall_seconds']:.0f} s; peak memory: {mem or 'unknown'}")
        return self.folder / "metrics.json"


def start_stage(run: Path, name: str, *, settings: Any = None, needs: tuple[str, ...] = (), resume: bool = True,
                ignore: tuple[str, ...] = (), echo=print) -> Stage:
    """Begin stage ``name`` of run folder ``run``: lock, check ``needs``, drop DONE, compare fingerprints.

    ``settings``: what this stage's output depends on (its config dataclass, seed, ...); ``ignore`` names
    top-level fields that may change without invalidating a checkpoint (``steps``: asking for more steps
    continues the run). With ``resume=True`` and an unchanged fingerprint the stage folder is kept, so a
    checkpoint in it can be resumed; otherwise the folder is emptied and the stage starts fresh (the line
    printed says why). Returns a ``Stage``; end it with ``stage.finish(metrics)``.
    """
    run, folder = Path(run), Path(run) / name
    acquire_lock(folder, f"stage {name} of run folder")
    require_stages(run, *needs)
    settings = jsonable(settings)
    if isinstance(settings, dict):
        settings = {k: v for k, v in settings.items() if k not in ignore}
    new = {"settings": settings, "upstream": {s: done_id(run, s) for s in needs}}
    new["hash"] = hashlib.sha256(json.dumps(new, sort_keys=True).encode()).hexdigest()[:16]
    for marker in ("DONE", "metrics.json"):  # from here on the stage is unfinished, whatever happens
        (folder / marker).unlink(missing_ok=True)
    old_path = folder / "fingerprint.json"
    old = read_json(old_path, fix=f"delete {folder}") if old_path.exists() else None
    contents = [p for p in folder.iterdir() if p.name not in (".lock", "fingerprint.json")]
    can_resume = resume and old is not None and old.get("hash") == new["hash"]
    if contents and not can_resume:
        if not resume:
            why = "resume=False"
        elif old is None:
            why = "it has no fingerprint.json, so what it was built from is unknown"
        else:
            why = "it was built from something else: " + "; ".join(fingerprint_changes(old, new))
        echo(f"{name}: starting fresh, clearing {folder} ({why})")
        for p in contents:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    elif contents:
        echo(f"{name}: same settings and upstream stages as the run in {folder}: its checkpoint, if any, is resumed")
    write_json(old_path, new)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    stage = _started[folder.resolve()] = Stage(run, name, folder, new, can_resume, time.time())
    return stage


_started: dict[Path, Stage] = {}  # stage folder -> the Stage this process started there


def finish_stage(run: Path, name: str, metrics: dict, *, echo=print) -> Path:
    """``stage.finish(metrics)`` for the stage this process started, or for a stage that never called
    ``start_stage`` (no fingerprint; wall time counted from the import of ``sawyer.runs``)."""
    folder = Path(run) / name
    stage = _started.pop(folder.resolve(), None)
    if stage is None:
        folder.mkdir(parents=True, exist_ok=True)
        stage = Stage(Path(run), name, folder, {"hash": None}, False, _IMPORTED)
    return stage.finish(metrics, echo=echo)


def read_metrics(run: Path, stage: str) -> dict:
    """A stage's ``metrics.json`` ({} when absent)."""
    path = Path(run) / stage / "metrics.json"
    return read_json(path, f"delete {path}") if path.exists() else {}


# --------------------------------------------------------------------------- 4. writing safely
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
        return True
    text = str(e)  # torch.save reports a failed write as a C++ stream error, safetensors as "os error 28"
    return any(s in text for s in ("iostream error", "file write failed", "No space left", "File too large",
                                   "os error 28", "os error 27", "Disk quota exceeded"))


@contextmanager
def disk_errors(where: Path, what: str = "files") -> Iterator[None]:
    """Turn a full disk (however the library reports it) into ``DiskFull`` naming the folder and the fix."""
    try:
        yield
    except Exception as e:
        if not _is_disk_full(e):
            raise
        raise DiskFull(errno.ENOSPC, f"no space left writing {what} into {where} ({type(e).__name__}: "
                                     f"{str(e)[:120]}): free space (e.g. delete old run folders under runs/) "
                                     "and re-run; the previous checkpoint, if any, is intact") from None


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temporary file, then rename): readers see the old or the new file, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with disk_errors(path.parent, path.name):
        tmp.write_text(json.dumps(obj, indent=2, default=lambda v: float(v) if hasattr(v, "__float__")
                                  else str(v)), encoding="utf-8")
        os.replace(tmp, path)


def _old(path: Path) -> Path:
    return path.with_name(f".{path.name}-old")


def recover(path: Path) -> Path | None:
    """Repair what a crash can leave around the checkpoint folder ``path``; return it if there is one.

    A crash mid-write leaves a temporary ``.NAME-tmp-*`` folder (deleted: the old checkpoint is intact); a
    crash between the two renames of the swap leaves only ``.NAME-old`` (renamed back: it is the last
    complete checkpoint); a crash after them leaves both (the old one is deleted).
    """
    path = Path(path)
    if not path.parent.is_dir():
        return None
    for tmp in path.parent.glob(f".{path.name}-tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    old = _old(path)
    if old.exists() and not path.exists():
        warnings.warn(f"{path} was missing after a crash mid-save; recovered the previous checkpoint {old}")
        os.rename(old, path)
    elif old.exists():
        shutil.rmtree(old, ignore_errors=True)
    return path if path.exists() else None


@contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """Write the folder ``path`` all-or-nothing: yield a temporary folder to fill, then swap it in.

    The swap is two renames (old -> ``.NAME-old``, new -> ``NAME``), then the old one is deleted; ``recover``
    handles a crash at any point. A full disk raises ``DiskFull`` and leaves the old checkpoint untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = path.with_name(f".{path.name}-tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with disk_errors(path.parent, f"checkpoint {path.name}"):
            yield tmp
        if path.exists():
            os.rename(path, _old(path))
        os.rename(tmp, path)
        shutil.rmtree(_old(path), ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- 5. reading safely
@contextmanager
def reading(path: Path, fix: str) -> Iterator[None]:
    """Turn any failure to read ``path`` (truncated zip, bad JSON, short safetensors) into ``DamagedFile``.

    ``fix`` says what to do, e.g. ``"delete runs/x/04_ppo/checkpoint or set resume=False"``.
    """
    try:
        yield
    except FileNotFoundError:
        raise DamagedFile(f"{path} is missing (an incomplete or damaged checkpoint): {fix}") from None
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:
        raise DamagedFile(f"{path} is damaged or truncated ({type(e).__name__}: {str(e)[:150]}): {fix}") from e


def read_json(path: Path, fix: str) -> Any:
    with reading(path, fix):
        return json.loads(Path(path).read_text(encoding="utf-8"))


def torch_load(path: Path, fix: str, **kwargs) -> Any:
    import torch

    with reading(path, fix):
        return torch.load(path, weights_only=True, **kwargs)


def read_log(path: Path, *, max_step: int | None = None) -> list[dict]:
    """The records of a JSON Lines log; with ``max_step``, keep only records up to it and rewrite the file.

    A torn last line (the process died while writing it) is dropped with a warning, and the file rewritten
    without it; a bad line elsewhere raises ``DamagedFile`` naming the line. Records from steps after
    ``max_step`` (a run that went on past its last checkpoint, then died) are dropped too, so a resumed run
    logs each step once.
    """
    path = Path(path)
    if not path.exists():
        return []
    with reading(path, f"delete {path} or set resume=False"):
        text = path.read_text(encoding="utf-8")
    lines, records, rewrite = text.split("\n"), [], False
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if i == len(lines):  # no newline after it: the write was cut off
                warnings.warn(f"{path}: dropped a torn last line ({line[:40]!r}...): the run died mid-write")
                rewrite = True
                continue
            raise DamagedFile(f"{path} line {i} is not valid JSON ({line[:60]!r}): delete {path} or set "
                              "resume=False") from None
    if max_step is not None:
        kept = [r for r in records if r.get("step", 0) <= max_step]
        rewrite, records = rewrite or len(kept) != len(records), kept
    if rewrite:
        write_text = "".join(json.dumps(r) + "\n" for r in records)
        tmp = path.with_name(f".{path.name}.tmp")
        with disk_errors(path.parent, path.name):
            tmp.write_text(write_text, encoding="utf-8")
            os.replace(tmp, path)
    return records
