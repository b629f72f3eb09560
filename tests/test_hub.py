"""Pull and push of finished stages, against local stand-ins for the hub (no network).

Two stand-ins: a local folder (the ``file://`` path ``sawyer.hub`` supports itself), and the hub path with
``huggingface_hub.snapshot_download`` / ``HfApi`` replaced by fakes backed by a folder, which check the
arguments our code sends (repo, revision, patterns, token) and raise the library's own error classes.
"""
import fnmatch
import json
import shutil
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import errors as hf_errors

from sawyer import hub, runs

TOKEN = "hf_secret_test_token_0123456789"


def _finished_sft(run: Path) -> Path:
    folder = run / "02_sft"
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_config.json").write_text('{"r": 8}')
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (folder / "adapter" / "tokenizer.json").write_text("{}")
    (folder / "checkpoint-4").mkdir()
    (folder / "checkpoint-4" / "optimizer.pt").write_bytes(b"pickle")  # must never travel
    (folder / "adapter" / "extra.bin").write_bytes(b"pickle")         # nor this
    (folder / "metrics.json").write_text('{"eval_loss_after": 1.0}')
    (folder / "DONE").write_text(json.dumps({"id": "abc123def456", "finished": "now", "fingerprint": None}))
    return folder


def test_local_round_trip_keeps_the_stage_and_its_identity(tmp_path):
    src = _finished_sft(tmp_path / "run_a")
    where = hub.push_stage(tmp_path / "run_a", "02_sft", str(tmp_path / "shared" / "sft"), echo=lambda *a: None)
    pushed = sorted(p.relative_to(where).as_posix() for p in Path(where).rglob("*") if p.is_file())
    assert pushed == ["DONE", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                      "adapter/tokenizer.json", "metrics.json"]  # no checkpoint, no pickle
    got = hub.pull_stage(f"file://{where}", tmp_path / "run_b", "02_sft", echo=lambda *a: None)
    assert (got / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights"
    assert runs.is_done(tmp_path / "run_b", "02_sft")
    assert runs.done_id(tmp_path / "run_b", "02_sft") == runs.done_id(src.parent, "02_sft") == "abc123def456"
    runs.require_stages(tmp_path / "run_b", "02_sft")  # what notebook 04 checks first
    assert not list((tmp_path / "run_b").glob(".pull-*"))  # no temporary folder left behind


def test_pull_refuses_a_repo_without_the_stage_files_and_leaves_the_run_untouched(tmp_path):
    fake = tmp_path / "not_a_stage"
    (fake / "adapter").mkdir(parents=True)
    (fake / "adapter" / "adapter_config.json").write_text("{}")
    (fake / "adapter" / "adapter_model.bin").write_bytes(b"pickle")  # a pickle is no substitute
    with pytest.raises(hub.HubError, match=r"missing adapter/adapter_model.safetensors"):
        hub.pull_stage(str(fake), tmp_path / "run", "02_sft", echo=lambda *a: None)
    assert not (tmp_path / "run" / "02_sft").exists()


def test_pull_keeps_a_finished_stage_unless_forced(tmp_path):
    _finished_sft(tmp_path / "run")
    other = _finished_sft(tmp_path / "other")
    (other / "adapter" / "adapter_model.safetensors").write_bytes(b"other weights")
    hub.pull_stage(str(other), tmp_path / "run", "02_sft", echo=lambda *a: None)
    assert (tmp_path / "run" / "02_sft" / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights"
    hub.pull_stage(str(other), tmp_path / "run", "02_sft", force=True, echo=lambda *a: None)
    assert (tmp_path / "run" / "02_sft" / "adapter" / "adapter_model.safetensors").read_bytes() == b"other weights"


def test_push_needs_a_finished_stage_and_unknown_stages_are_named(tmp_path):
    folder = _finished_sft(tmp_path / "run")
    (folder / "DONE").unlink()
    with pytest.raises(hub.HubError, match="not a finished 02_sft stage"):
        hub.push_stage(tmp_path / "run", "02_sft", str(tmp_path / "x"))
    with pytest.raises(ValueError, match="unknown stage '05_eval'.*02_sft, 03_reward_model, 04_ppo"):
        hub.pull_stage("me/x", tmp_path / "run", "05_eval")


# --------------------------------------------------------------------------- the hub path, with a fake hub
@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A folder per repo id; fakes of snapshot_download / HfApi that read and write it like the hub would."""
    root = tmp_path / "hub"
    calls = []

    def snapshot_download(repo_id, revision=None, local_dir=None, token=None, allow_patterns=None,
                          ignore_patterns=None, **kw):
        calls.append({"op": "download", "repo": repo_id, "revision": revision, "token": token})
        repo = root / repo_id
        if not repo.exists():
            url = f"https://huggingface.co/api/models/{repo_id}"
            raise hf_errors.RepositoryNotFoundError(f"404 Client Error: {repo_id}", response=httpx2.Response(
                404, request=httpx2.Request("GET", url)))
        for f in repo.rglob("*"):
            rel = f.relative_to(repo).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns) and \
                    not any(fnmatch.fnmatch(f.name, p) for p in ignore_patterns):
                (Path(local_dir) / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, Path(local_dir) / rel)
        (Path(local_dir) / ".cache").mkdir(exist_ok=True)  # what huggingface_hub leaves in a local_dir
        return local_dir

    class HfApi:
        def __init__(self, token=None):
            self.token = token

        def create_repo(self, repo_id, private=False, exist_ok=False, **kw):
            calls.append({"op": "create", "repo": repo_id, "private": private, "token": self.token})
            (root / repo_id).mkdir(parents=True, exist_ok=True)

        def upload_folder(self, repo_id, folder_path, allow_patterns=None, commit_message="", **kw):
            calls.append({"op": "upload", "repo": repo_id, "files": list(allow_patterns), "token": self.token})
            for rel in allow_patterns:
                (root / repo_id / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(Path(folder_path) / rel, root / repo_id / rel)
            return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/0123abcd"})()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "HfApi", HfApi)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    return calls


def test_hub_push_then_pull_with_a_token_that_is_never_printed(tmp_path, fake_hub, monkeypatch):
    _finished_sft(tmp_path / "run_a")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    said = []
    url = hub.push_stage(tmp_path / "run_a", "02_sft", "me/sawyer-sft", echo=said.append)
    assert url.endswith("/me/sawyer-sft/commit/0123abcd")
    create, upload = fake_hub
    assert create == {"op": "create", "repo": "me/sawyer-sft", "private": True, "token": TOKEN}
    assert "checkpoint-4/optimizer.pt" not in upload["files"] and "adapter/extra.bin" not in upload["files"]
    got = hub.pull_stage("me/sawyer-sft@0123abcd", tmp_path / "run_b", "02_sft",
                         echo=said.append)
    assert fake_hub[-1] == {"op": "download", "repo": "me/sawyer-sft", "revision": "0123abcd", "token": TOKEN}
    assert (got / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights"
    assert not (got / ".cache").exists() and (got / "FROM_HUB").read_text().strip() == "me/sawyer-sft@0123abcd"
    assert TOKEN not in "\n".join(said)


def test_push_without_a_token_says_how_to_get_one_before_any_network(tmp_path, fake_hub):
    _finished_sft(tmp_path / "run")
    with pytest.raises(hub.HubError, match="needs a hub token with write access.*HF_TOKEN"):
        hub.push_stage(tmp_path / "run", "02_sft", "me/sawyer-sft")
    assert fake_hub == []


def test_offline_is_a_clear_error(tmp_path, fake_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.HubError, match=r"offline mode is on \(HF_HUB_OFFLINE=1\)"):
        hub.pull_stage("me/sawyer-sft", tmp_path / "run", "02_sft")
    _finished_sft(tmp_path / "run")
    with pytest.raises(hub.HubError, match="offline"):
        hub.push_stage(tmp_path / "run", "02_sft", "me/sawyer-sft", token=TOKEN)
    assert fake_hub == []


def test_library_errors_become_advice_without_the_token(tmp_path, fake_hub, monkeypatch):
    with pytest.raises(hub.HubError, match="no such repo, or it is private") as e:
        hub.pull_stage("me/missing", tmp_path / "run", "03_reward_model", token=TOKEN)
    assert TOKEN not in str(e.value)

    def unreachable(**kw):
        raise hf_errors.LocalEntryNotFoundError(f"cannot reach the hub with token {TOKEN}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(hub.HubError, match="cannot be reached") as e:
        hub.pull_stage("me/sawyer-sft", tmp_path / "run", "02_sft", token=TOKEN)
    assert TOKEN not in str(e.value) and "<token>" in str(e.value)


def test_pull_stages_skips_parameters_left_none(tmp_path):
    src = _finished_sft(tmp_path / "a")
    pulled = hub.pull_stages(tmp_path / "b", {"02_sft": str(src), "03_reward_model": None}, echo=lambda *a: None)
    assert [p.name for p in pulled] == ["02_sft"] and not (tmp_path / "b" / "03_reward_model").exists()
