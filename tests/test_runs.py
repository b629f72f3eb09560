"""Tests of sawyer.runs and sawyer.checkpoints: run folders, DONE markers, fingerprints, locks, checkpoints.

A killed and resumed training run of every stage (PPO causal for 04, PPO seq2seq for 01, SFT for 02, the
reward model for 03) must match an uninterrupted one exactly; every damaged file gives an error that names
it. Everything runs on tiny models (CPU, offline) with fixed seeds. The same rules through the real runner
and notebooks (a SIGKILLed re-run of 02, then 04 refusing to resume across it) are in test_notebooks.py.
"""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from test_ppo import DESIGN_STATS, lora_params, make_policy, prompts_for, word_reward

from sawyer import checkpoints, ppo, runs, workshop
from sawyer.ppo import PPOConfig


@pytest.fixture(autouse=True)
def _release_locks():
    """Locks a test's stages left held (as a kernel would until it ends) are released after it."""
    yield
    for path in list(runs._held):
        runs.release_lock(path.parent)


def python(code: str, **kwargs) -> subprocess.Popen:
    """Run ``code`` in a fresh Python (the repository's), as a separate process we can kill."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=runs.REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


# ----------------------------------------------------------------------------- where the run folder lives
def test_default_run_folder_is_runs_name_and_ignored_by_git(tmp_path):
    name = f"test-{os.getpid()}"
    path = runs.resolve_run_dir(name, "tiny", use_drive="auto")  # not on Colab: local
    try:
        assert path == runs.REPO_ROOT / "runs" / name and path.is_dir()
        assert runs.resolve_run_dir(f"runs/{name}", "tiny") == path  # the spelling the README uses
        assert workshop.resolve_run_dir(name, "tiny") == path
        ignored = subprocess.run(["git", "check-ignore", "-q", str(path / "04_ppo" / "adapter")], cwd=runs.REPO_ROOT)
        assert ignored.returncode == 0, "runs/ must be git-ignored"
    finally:
        path.rmdir()
    assert runs.resolve_run_dir(tmp_path / "abs", "tiny") == tmp_path / "abs"
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=f"run folder {tmp_path / 'file'} is a file"):
        runs.resolve_run_dir(tmp_path / "file", "tiny")
    with pytest.raises(RuntimeError, match="Colab only"):
        runs.resolve_run_dir("x", "tiny", use_drive=True)


# ----------------------------------------------------------------------------- stages, DONE, fingerprints
def test_done_goes_at_start_and_comes_back_only_at_finish(tmp_path):
    lines = []
    stage = runs.start_stage(tmp_path, "02_sft", settings={"lr": 1e-3}, echo=lines.append)
    (stage.folder / "adapter.bin").write_text("v1")
    assert not runs.is_done(tmp_path, "02_sft")
    stage.finish({"loss": 0.5}, echo=lines.append)
    metrics = runs.read_metrics(tmp_path, "02_sft")
    assert runs.is_done(tmp_path, "02_sft") and metrics["loss"] == 0.5
    assert metrics["wall_seconds"] >= 0 and 0 < metrics["peak_cpu_rss_gib"] < 1000
    assert "02_sft done in" in lines[-1] and "peak memory: cpu rss" in lines[-1]
    first_id = runs.done_id(tmp_path, "02_sft")

    again = runs.start_stage(tmp_path, "02_sft", settings={"lr": 1e-3}, echo=lines.append)  # a re-run starts
    assert not runs.is_done(tmp_path, "02_sft") and not (again.folder / "metrics.json").exists()
    assert again.resume and (again.folder / "adapter.bin").exists()  # same settings: its files may be resumed
    with pytest.raises(RuntimeError, match="lacks the finished stage.*02_sft"):
        runs.start_stage(tmp_path, "04_ppo", needs=("02_sft",))
    runs.finish_stage(tmp_path, "02_sft", {"loss": 0.4})  # the runner's/notebooks' spelling
    assert runs.done_id(tmp_path, "02_sft") != first_id  # every finish is a new output identity


def test_fingerprint_mismatch_is_named_and_starts_fresh(tmp_path):
    lines = []
    runs.start_stage(tmp_path, "02_sft", settings={"lr": 1e-3}).finish({})
    ppo_stage = runs.start_stage(tmp_path, "04_ppo", settings={"kl_coef": 0.2, "steps": 8}, needs=("02_sft",),
                                 ignore=("steps",))
    (ppo_stage.folder / "checkpoint").mkdir()
    ppo_stage.finish({})

    same = runs.start_stage(tmp_path, "04_ppo", settings={"kl_coef": 0.2, "steps": 16}, needs=("02_sft",),
                            ignore=("steps",), echo=lines.append)  # more steps: continue the run
    assert same.resume and (same.folder / "checkpoint").is_dir()
    same.finish({})
    runs.start_stage(tmp_path, "02_sft", settings={"lr": 1e-3}).finish({})  # SFT re-trained
    assert runs.is_done(tmp_path, "04_ppo") and runs.stale_upstream(tmp_path, "04_ppo") == ["02_sft"]
    with pytest.raises(RuntimeError, match="stage 04_ppo .* was built from an older 02_sft .*re-run notebook 04"):
        runs.require_stages(tmp_path, "02_sft", "04_ppo")  # what 05 checks: a stale DONE is not good enough
    changed = runs.start_stage(tmp_path, "04_ppo", settings={"kl_coef": 0.1, "steps": 8}, needs=("02_sft",),
                               ignore=("steps",), echo=lines.append)
    assert not changed.resume and not (changed.folder / "checkpoint").exists()
    assert "starting fresh" in lines[-1] and "upstream stage 02_sft was re-run" in lines[-1]
    assert "settings.kl_coef: 0.2 -> 0.1" in lines[-1]
    runs.release_lock(changed.folder)
    (changed.folder / "checkpoint").mkdir()
    fresh = runs.start_stage(tmp_path, "04_ppo", settings={"kl_coef": 0.1, "steps": 8}, needs=("02_sft",),
                             resume=False, echo=lines.append)
    assert not fresh.resume and not (fresh.folder / "checkpoint").exists() and "resume=False" in lines[-1]


def test_two_runs_on_one_folder_are_refused_with_a_clear_message(tmp_path):
    holder = python(f"""
        from sawyer import runs
        runs.start_stage({str(tmp_path)!r}, "04_ppo")
        runs.acquire_lock({str(tmp_path)!r}, "run folder")
        print("locked", flush=True)
        import time; time.sleep(60)
    """)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(runs.RunLocked, match=rf"stage 04_ppo .* in use by another run \(pid {holder.pid} "):
            runs.start_stage(tmp_path, "04_ppo")
        with pytest.raises(runs.RunLocked, match="run folder .* in use by another run .*use another run_dir"):
            workshop.run("tiny", run_dir=str(tmp_path), only=["01"], echo=lambda *a, **k: None)
    finally:
        holder.kill()
        holder.wait()
    runs.start_stage(tmp_path, "04_ppo")  # a dead holder's lock is gone with it: no stale lock


# ----------------------------------------------------------------------------- writing and reading safely
def small_training(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Dropout(0.5), torch.nn.Linear(64, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def test_a_crash_between_the_two_renames_recovers_the_previous_checkpoint(tmp_path):
    ckpt = tmp_path / "checkpoint"
    killed = python(f"""
        import os, signal, torch
        from sawyer import checkpoints, runs
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 4)
        opt = torch.optim.AdamW(model.parameters())
        checkpoints.save_training_checkpoint({str(ckpt)!r}, model, opt, extra={{"step": 1}})
        real = os.rename
        def rename_then_die(a, b):  # the first rename of the swap happens, then the process is killed
            real(a, b)
            os.kill(os.getpid(), signal.SIGKILL)
        runs.os.rename = rename_then_die
        checkpoints.save_training_checkpoint({str(ckpt)!r}, model, opt, extra={{"step": 2}})
    """)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    assert not ckpt.exists() and (tmp_path / ".checkpoint-old").is_dir()  # the crash window
    assert list(tmp_path.glob(".checkpoint-tmp-*"))  # and the temporary folder it was writing
    model, opt = torch.nn.Linear(4, 4), None
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.warns(UserWarning, match="recovered the previous checkpoint"):
        extra = checkpoints.load_training_checkpoint(ckpt, model, opt)
    assert extra == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no leftover temporary folders


def test_a_failed_write_keeps_the_old_checkpoint_and_leaves_no_temp_folder(tmp_path):
    model, opt = small_training()
    checkpoints.save_training_checkpoint(tmp_path / "checkpoint", model, opt, extra={"step": 1})
    with pytest.raises(ZeroDivisionError):
        with runs.atomic_folder(tmp_path / "checkpoint") as tmp:
            (tmp / "half").write_text("x")
            1 / 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert runs.read_json(tmp_path / "checkpoint" / "trainer_state.json", "") == {"step": 1}


def test_a_full_disk_gives_a_named_error(tmp_path):
    """A real failed write: the file-size limit makes the kernel refuse writes (EFBIG) as a full disk would."""
    done = python(f"""
        import resource, signal, torch
        from sawyer import checkpoints, runs
        model = torch.nn.Linear(512, 512)
        opt = torch.optim.AdamW(model.parameters())
        checkpoints.save_training_checkpoint({str(tmp_path / "checkpoint")!r}, torch.nn.Linear(2, 2),
                                             torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()), extra={{"step": 1}})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        try:
            checkpoints.save_training_checkpoint({str(tmp_path / "checkpoint")!r}, model, opt, extra={{"step": 2}})
        except runs.DiskFull as e:
            print("DiskFull:", e)
    """)
    out, _ = done.communicate(timeout=120)
    assert f"DiskFull: [Errno 28] no space left writing checkpoint checkpoint into {tmp_path}" in out, out
    assert "free space" in out and "previous checkpoint, if any, is intact" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert runs.read_json(tmp_path / "checkpoint" / "trainer_state.json", "") == {"step": 1}


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def ppo_checkpoint(tmp_path_factory):
    """A real PPO checkpoint of the tiny llama after one step, and a state to load it into."""
    run = tmp_path_factory.mktemp("ppo_ckpt")
    policy, tok = make_policy("llama")
    state = ppo.setup(policy, tok, PPOConfig(mini_batch_size=4, max_new_tokens=4), run_dir=run)
    checkpoints.train(state, prompts_for("llama", 8), word_reward("the"), steps=1, checkpoint_every=1, progress=False)
    return state, run / "checkpoint"


@pytest.mark.parametrize("name", ["adapter/adapter_model.safetensors", "value_head.pt", "optimizer.pt", "rng.pt",
                                  "trainer_state.json"])
def test_each_damaged_ppo_checkpoint_file_is_named(ppo_checkpoint, tmp_path, name):
    state, original = ppo_checkpoint
    import shutil

    ckpt = tmp_path / "checkpoint"
    shutil.copytree(original, ckpt)
    truncate(ckpt / name)
    with pytest.raises(runs.DamagedFile, match=rf"{ckpt / name} is damaged or truncated .*: delete {ckpt} or set "
                                               r"resume=False"):
        checkpoints.load_checkpoint(state, ckpt)
    (ckpt / name).unlink()
    with pytest.raises(runs.DamagedFile, match=rf"{ckpt / name} is missing"):
        checkpoints.load_checkpoint(state, ckpt)


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json"])
def test_each_damaged_training_checkpoint_file_is_named(tmp_path, name):
    model, opt = small_training()
    ckpt = checkpoints.save_training_checkpoint(tmp_path / "checkpoint", model, opt, extra={"step": 3})
    truncate(ckpt / name)
    with pytest.raises(runs.DamagedFile, match=rf"{ckpt / name} is damaged or truncated .*: delete {ckpt} or set "
                                               r"resume=False"):
        checkpoints.load_training_checkpoint(ckpt, *small_training())
    with pytest.raises(runs.DamagedFile, match=rf"{ckpt / name} is damaged"):  # the SFT (Trainer) check
        checkpoints.check_files(ckpt, f"delete {ckpt} or set resume=False")


def test_trainer_checkpoints_skip_an_incomplete_one_and_name_a_damaged_one(tmp_path):
    model, opt = small_training()
    for step in (2, 4, 6):
        checkpoints.save_training_checkpoint(tmp_path / f"checkpoint-{step}", model, opt, extra={"step": step})
    (tmp_path / "checkpoint-6" / "trainer_state.json").unlink()  # killed while the Trainer was saving it
    with pytest.warns(UserWarning, match="checkpoint-6 is incomplete"):
        assert checkpoints.last_trainer_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    truncate(tmp_path / "checkpoint-4" / "optimizer.pt", 0.9)
    with pytest.warns(UserWarning), pytest.raises(runs.DamagedFile, match="checkpoint-4/optimizer.pt is damaged"):
        checkpoints.last_trainer_checkpoint(tmp_path)


def test_a_torn_last_log_line_is_dropped_with_a_warning(tmp_path):
    log = tmp_path / "ppo_log.jsonl"
    log.write_text('{"step": 1, "x": 1}\n{"step": 2, "x": 2}\n{"step": 3, "x"')
    with pytest.warns(UserWarning, match="dropped a torn last line"):
        assert [r["step"] for r in runs.read_log(log)] == [1, 2]
    assert log.read_text() == '{"step": 1, "x": 1}\n{"step": 2, "x": 2}\n'
    assert [r["step"] for r in runs.read_log(log, max_step=1)] == [1] and log.read_text().count("\n") == 1
    log.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(runs.DamagedFile, match=rf"{log} line 2 is not valid JSON .*delete {log} or set resume=False"):
        runs.read_log(log)


# ----------------------------------------------------------------------------- kill and resume, per stage
@pytest.mark.parametrize("kind", ["llama", "t5"])  # notebook 04's causal policy, notebook 01's seq2seq one
def test_resume_gives_the_same_parameters_and_stats(tmp_path, kind):
    cfg = PPOConfig(learning_rate=5e-3, mini_batch_size=4, kl_coef=0.1, kl_target=0.5, kl_horizon=100,
                    max_new_tokens=8, gradient_checkpointing=False)
    prompts, reward = prompts_for(kind, 10), word_reward("the")

    policy, tok = make_policy(kind)
    straight = ppo.setup(policy, tok, cfg, run_dir=tmp_path / "straight")
    history = checkpoints.train(straight, prompts, reward, steps=4, progress=False)

    policy, tok = make_policy(kind)
    first = ppo.setup(policy, tok, cfg, run_dir=tmp_path / "resumed")
    checkpoints.train(first, prompts, reward, steps=2, checkpoint_every=2, progress=True)  # the tqdm bar too
    with open(tmp_path / "resumed" / "ppo_log.jsonl", "a") as f:  # a step that ran but was never checkpointed
        f.write(json.dumps({"step": 3, "objective/score": -1.0}) + "\n" + '{"step": 4, "objective/sc')  # torn
    policy, tok = make_policy(kind, seed=123)  # different LoRA init: everything must come from the checkpoint
    with pytest.warns(UserWarning, match="torn last line"):
        resumed = checkpoints.load_checkpoint(ppo.setup(policy, tok, cfg, run_dir=tmp_path / "resumed"))
    assert resumed.step == 2
    checkpoints.train(resumed, prompts, reward, steps=4, progress=False)

    for n, p in lora_params(straight.policy).items():
        torch.testing.assert_close(lora_params(resumed.policy)[n], p, atol=0, rtol=0)
    for n, p in straight.value_head.named_parameters():
        torch.testing.assert_close(dict(resumed.value_head.named_parameters())[n], p, atol=0, rtol=0)
    assert resumed.kl_ctl.value == straight.kl_ctl.value != cfg.kl_coef
    logs = [[json.loads(line) for line in (tmp_path / run / "ppo_log.jsonl").read_text().splitlines()]
            for run in ("straight", "resumed")]
    assert [s["step"] for s in logs[1]] == [1, 2, 3, 4]
    no_time = lambda s: {k: v for k, v in s.items() if not k.startswith("time/")}  # noqa: E731
    assert [no_time(s) for s in logs[0]] == [no_time(s) for s in logs[1]] == [no_time(s) for s in history]
    assert set(DESIGN_STATS) <= set(history[0])
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == ["checkpoint", "ppo_log.jsonl"]  # no temp dirs




def test_reward_model_resumes_to_the_same_weights_and_log(tmp_path, monkeypatch):
    """Notebook 03's loop: killed after step 5 (checkpoint at 4), resumed into a differently initialised model."""
    from test_reward import Pair, _tiny_bert

    from sawyer import reward, tiny
    from sawyer.loading import load_classifier, load_tokenizer
    from sawyer.presets import RewardConfig

    tok = load_tokenizer(str(tiny.build("minilm")))
    pairs = [Pair(f"question {i}?", f"a good long answer {i}", f"bad {i}", 1.0 + i % 3) for i in range(12)]
    cfg = RewardConfig(max_length=32, learning_rate=1e-3, batch_size=2, max_steps=8, seed=1)

    def train(run, seed, **kw):
        model = load_classifier(_tiny_bert(tmp_path / f"init{seed}", tok, 1, seed=seed))  # dropout 0.1: RNG matters
        hist = reward.train_reward_model(model, tok, pairs, cfg, run_dir=tmp_path / run, progress=False,
                                         log_every=3, checkpoint_dir=tmp_path / run / "checkpoint",
                                         checkpoint_every=4, **kw)
        return model, hist

    straight, hist = train("straight", seed=3)
    calls, real = [0], reward._forward_scores

    def dies_at_step_6(*a, **k):
        calls[0] += 1
        if calls[0] == 6:
            raise KeyboardInterrupt("killed")  # the process dies in step 6: step 5 ran, never checkpointed
        return real(*a, **k)

    monkeypatch.setattr(reward, "_forward_scores", dies_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train("resumed", seed=3)
    monkeypatch.setattr(reward, "_forward_scores", real)
    resumed, hist2 = train("resumed", seed=99, resume=True)
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(q, p, atol=0, rtol=0, msg=n)
    assert hist2 == hist and [r["step"] for r in hist] == [3, 6, 8]
    logs = [runs.read_log(tmp_path / run / "reward_log.jsonl") for run in ("straight", "resumed")]
    assert logs[0] == logs[1] == hist


def test_sft_resumes_to_the_same_adapter_and_log(tmp_path, monkeypatch):
    """Notebook 02's Trainer: killed in step 4 (checkpoints at 2), resumed with ``resume_from_checkpoint=True``."""
    from transformers import TrainerCallback

    from sawyer import sft
    from sawyer.data import load_conversations
    from sawyer.presets import get_preset

    cfg = dataclasses.replace(get_preset("tiny").sft, max_steps=4, batch_size=2, eval_batches=1)
    conversations, _ = load_conversations(cfg.datasets, max_rows=12)

    def train(out, seed, **kw):
        torch.manual_seed(seed)
        model, tok, _ = sft.prepare_sawyer_model(cfg, verbose=False)
        examples, _ = sft.build_examples(conversations, tok, cfg.max_seq_len)
        result = sft.train_sft(model, tok, examples, examples[:2], cfg, output_dir=tmp_path / out, progress=False,
                               save_steps=2, **kw)
        return model, result

    class Die(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:  # step 3 ran and was logged, never checkpointed
                raise KeyboardInterrupt("killed")

    straight, result = train("straight", seed=0)
    make_trainer = sft._adapter_only_trainer
    monkeypatch.setattr(sft, "_adapter_only_trainer", lambda **kw: (t := make_trainer(**kw), t.add_callback(Die()))[0])
    with pytest.raises(KeyboardInterrupt):
        train("resumed", seed=0)
    monkeypatch.setattr(sft, "_adapter_only_trainer", make_trainer)
    resumed, result2 = train("resumed", seed=7, resume_from_checkpoint=True)
    assert result2["steps"] == 4 and result2["eval_loss_after"] == result["eval_loss_after"]
    trained = {n: p for n, p in straight.named_parameters() if p.requires_grad}
    for n, p in resumed.named_parameters():
        if n in trained:
            torch.testing.assert_close(p, trained[n], atol=0, rtol=0, msg=n)
    logs = [[{k: v for k, v in r.items() if "runtime" not in k and "per_second" not in k}
             for r in runs.read_log(tmp_path / out / "sft_log.jsonl")] for out in ("straight", "resumed")]
    logs[1].sort(key=lambda r: r["step"])  # the resumed run evaluates "before" (step 0) again after step 2
    assert [r["step"] for r in logs[1]] == [r["step"] for r in logs[0]]  # each step logged once
    assert [r.get("loss") for r in logs[1]] == [r.get("loss") for r in logs[0]]
    assert [r.get("eval_loss") for r in logs[1]] == [r.get("eval_loss") for r in logs[0]]
