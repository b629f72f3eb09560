"""Pull a finished stage from the model hub into the run folder, or push one there.

Why: each notebook builds on the stages before it (02's SFT adapter, 03's reward model, 04's PPO adapter).
An attendee whose notebook 02 failed, or who skipped it to save time, can continue from a published stage::

    hub.pull_stage("someone/sawyer-sft-t4", run, "02_sft")      # notebook 04/05: sft_from_hub = "..."
    hub.push_stage(run, "02_sft", "me/sawyer-sft-t4")           # notebook 02: push_to_hub = "..."

(The original workshop published every stage on the hub as well.)

A hub repo holds one stage exactly as its run-folder sub-folder: ``adapter/`` or ``model/`` plus
``metrics.json``, ``DONE`` and the logs (``STAGES`` lists what each stage publishes). Pulling downloads only
those files (never pickles: weights are ``*.safetensors``), checks that the files later notebooks read are
there, then moves them into ``run/<stage>`` and marks it done, so ``require_stages``/``start_stage`` accept it.
``repo_id`` may carry a revision (``"me/sawyer-sft@<commit>"``) or be a local folder / ``file://`` URL:
the stand-in the tests use, and a way to share a stage on a USB stick or a shared drive.

Errors say what to do: offline (``HF_HUB_OFFLINE=1`` or no network), no token for a push (a *write* token is
needed; the Colab ``HF_TOKEN`` secret works), an unknown repo, a repo that lacks the stage's files.
A token is passed to ``huggingface_hub`` and never printed; error texts are scrubbed of it.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
import uuid
from datetime import datetime
from pathlib import Path

#: What each stage publishes (glob patterns, relative to the stage folder) and which files must be there.
STAGES = {
    "02_sft": {"patterns": ("adapter/*", "metrics.json", "DONE", "sft_log.jsonl"),
               "required": ("adapter/adapter_config.json", "adapter/adapter_model.safetensors")},
    "03_reward_model": {"patterns": ("model/*", "metrics.json", "DONE", "reward_log.jsonl"),
                        "required": ("model/config.json", "model/model.safetensors")},
    "04_ppo": {"patterns": ("adapter/*", "test_prompts.json", "metrics.json", "DONE", "ppo_log.jsonl"),
               "required": ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "test_prompts.json")},
}
NEVER = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")  # pickles: never pulled, never pushed


class HubError(RuntimeError):
    """A stage could not be pulled or pushed; the message says why and what to do."""


def _stage(stage: str) -> dict:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages that can be pulled or pushed: {', '.join(STAGES)}")
    return STAGES[stage]


def _local(repo_id: str) -> Path | None:
    """The folder a ``file://`` URL or an existing local path names, else None (a hub repo id)."""
    if repo_id.startswith("file://"):
        return Path(repo_id[len("file://"):])
    path = Path(repo_id).expanduser()
    return path if (path.is_absolute() or repo_id.startswith(".")) or path.exists() else None


def _selected(folder: Path, patterns) -> list[str]:
    """Files under ``folder`` (relative, posix) that match ``patterns`` and are not pickles."""
    out = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = f.relative_to(folder).as_posix()
        if any(fnmatch.fnmatch(rel, p) for p in patterns) and not any(fnmatch.fnmatch(f.name, n) for n in NEVER):
            out.append(rel)
    return out


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "<token>") if token else text


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _explain(action: str, repo_id: str, err: Exception, token: str | None) -> HubError:
    kind = type(err).__name__
    if kind == "RepositoryNotFoundError":
        hint = "no such repo, or it is private/gated and this token cannot see it: check the id and your access"
    elif kind == "RevisionNotFoundError":
        hint = "the repo has no such revision: check the commit or branch after '@'"
    elif kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or isinstance(err, (ConnectionError, TimeoutError)):
        hint = "the hub cannot be reached (offline?): connect, or use a run folder that has the stage"
    elif kind == "HfHubHTTPError" and (" 401" in str(err) or " 403" in str(err)):
        hint = "the hub refused this token: a push needs a token with *write* access"
    else:
        hint = "see the error below"
    return HubError(_scrub(f"could not {action} {repo_id!r}: {hint}. ({kind}: {err})", token))


def _split(repo_id: str) -> tuple[str, str | None]:
    from sawyer.loading import split_revision

    return split_revision(repo_id)


def _mark_done(folder: Path, source: str) -> None:
    """Keep the DONE that came with the stage (its id ties later stages to it); write one if it had none."""
    done = folder / "DONE"
    if not done.exists():
        done.write_text(json.dumps({"id": uuid.uuid4().hex[:12], "finished": datetime.now().isoformat(timespec="seconds"),
                                    "fingerprint": None}) + "\n", encoding="utf-8")
    (folder / "FROM_HUB").write_text(source + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- pull
def pull_stage(repo_id: str, run: str | Path, stage: str, *, token: str | None = None, force: bool = False,
               echo=print) -> Path:
    """Download a finished ``stage`` from ``repo_id`` into ``run/<stage>``; returns that folder.

    Steps: 1. download the stage's files (not pickles) into a temporary folder next to the run folder;
    2. check the files later notebooks read are there; 3. swap it in for ``run/<stage>`` (an unfinished or
    older copy there is replaced; a finished one is kept unless ``force``) and mark it done.
    """
    spec = _stage(stage)
    run = Path(run)
    target = run / stage
    if (target / "DONE").exists() and not force:
        echo(f"{stage}: already finished in {run}; not pulling {repo_id} (force=True replaces it)")
        return target
    run.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=run, prefix=f".pull-{stage}-") as tmp:
        tmp = Path(tmp) / stage
        source = _download(repo_id, spec["patterns"], tmp, token)
        missing = [f for f in spec["required"] if not (tmp / f).is_file()]
        if missing:
            raise HubError(f"{repo_id!r} does not hold a finished {stage} stage: missing {', '.join(missing)} "
                           f"(a stage repo mirrors the run folder's {stage}/ folder; push one with hub.push_stage)")
        _mark_done(tmp, source)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    echo(f"{stage}: pulled from {source} into {target}")
    return target


def _download(repo_id: str, patterns, dest: Path, token: str | None) -> str:
    """Fill ``dest`` with the stage files of ``repo_id``; returns a description of the exact source."""
    local = _local(repo_id)
    if local is not None:
        if not local.is_dir():
            raise HubError(f"no such local stage folder: {local}")
        for rel in _selected(local, patterns):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(local / rel, dest / rel)
        return str(local)
    repo, revision = _split(repo_id)
    if _offline():
        raise HubError(f"could not pull {repo_id!r}: offline mode is on (HF_HUB_OFFLINE=1); unset it and connect, "
                       "or use a run folder that already has the stage")
    from huggingface_hub import snapshot_download

    if token is None:
        from sawyer.check import hub_token

        token = hub_token()[0]  # optional for a public repo; needed for a private one
    try:
        snapshot_download(repo_id=repo, revision=revision, local_dir=str(dest), token=token,
                          allow_patterns=list(patterns), ignore_patterns=list(NEVER))
    except Exception as e:  # huggingface_hub's error classes vary by version: classified by name in _explain
        raise _explain("pull", repo_id, e, token) from e
    shutil.rmtree(dest / ".cache", ignore_errors=True)  # huggingface_hub's download metadata
    return f"{repo}@{revision or 'main'}"


# --------------------------------------------------------------------------- push
def push_stage(run: str | Path, stage: str, repo_id: str, *, token: str | None = None, private: bool = True,
               echo=print) -> str:
    """Upload the finished ``run/<stage>`` to ``repo_id`` (created private if new); returns where it went.

    Only a finished stage is pushed (its ``DONE`` exists), and only what later notebooks read (``STAGES``),
    never pickles such as optimiser state.
    """
    spec = _stage(stage)
    folder = Path(run) / stage
    if not (folder / "DONE").exists():
        raise HubError(f"{folder} is not a finished {stage} stage (no DONE): run its notebook to the end first")
    files = _selected(folder, spec["patterns"])
    missing = [f for f in spec["required"] if f not in files]
    if missing:
        raise HubError(f"{folder} lacks {', '.join(missing)}: nothing consistent to push")
    local = _local(repo_id)
    if local is not None:
        for rel in files:
            (local / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / rel, local / rel)
        echo(f"{stage}: pushed {len(files)} files to {local}")
        return str(local)
    repo, revision = _split(repo_id)
    if revision:
        raise HubError(f"push to {repo!r} without '@{revision}': a push always makes a new commit on main")
    if _offline():
        raise HubError(f"could not push to {repo!r}: offline mode is on (HF_HUB_OFFLINE=1)")
    if token is None:
        from sawyer.check import hub_token

        token, where = hub_token()
        if not token:
            raise HubError(f"pushing to {repo!r} needs a hub token with write access: create one at "
                           f"huggingface.co/settings/tokens and store it as HF_TOKEN (Colab: key icon). Token: {where}")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo, folder_path=str(folder), allow_patterns=files,
                                 commit_message=f"SAWYER stage {stage}")
    except Exception as e:  # classified by name in _explain
        raise _explain("push to", repo, e, token) from e
    url = str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo}")
    echo(f"{stage}: pushed {len(files)} files to {url}")
    return url


def pull_stages(run: str | Path, sources: dict[str, str | None], *, echo=print) -> list[Path]:
    """``pull_stage`` for each ``{stage: repo_id}`` whose repo is set (notebook parameters left None are skipped)."""
    return [pull_stage(repo, run, stage, echo=echo) for stage, repo in sources.items() if repo]
