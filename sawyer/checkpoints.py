"""PPO checkpoints and the training loop: save, load (resume), the batch of each step, ``train``.

Moved out of ``sawyer.ppo`` so ``ppo.py`` holds only the algorithm; ``ppo.save_checkpoint`` and friends still
work (they forward here). Run folders, DONE markers and fingerprints live in ``sawyer.runs``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from sawyer.ppo import PPOState, rollout, score, update


def save_checkpoint(state: PPOState, path: str | Path | None = None) -> Path:
    """Write adapter, value head, optimiser, KL controller, RNG states, step and config to ``path``
    (default ``run_dir/checkpoint``), atomically: into a temporary folder that is then renamed."""
    path = Path(path) if path is not None else _run_dir(state) / "checkpoint"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        state.policy.save_pretrained(tmp / "adapter", selected_adapters=[state.adapter], save_embedding_layers=False)
        torch.save(state.value_head.state_dict(), tmp / "value_head.pt")
        torch.save(state.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, tmp / "rng.pt")
        np_state = np.random.get_state()
        meta = {"step": state.step, "kl_coef": state.kl_ctl.value, "adapter": state.adapter,
                "config": dataclasses.asdict(state.config), "python_rng": random.getstate(),
                "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
        (tmp / "trainer_state.json").write_text(json.dumps(meta), encoding="utf-8")
        if path.exists():  # swap: old aside, new in, old deleted
            old = path.with_name(f".{path.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_checkpoint(state: PPOState, path: str | Path | None = None) -> PPOState:
    """Restore a checkpoint written by ``save_checkpoint`` into ``state`` (built by ``setup`` as before).

    Lines of ``run_dir/ppo_log.jsonl`` from steps after the checkpoint (a run that went on and then died)
    are dropped, so the log continues cleanly.
    """
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    path = Path(path) if path is not None else _run_dir(state) / "checkpoint"
    if not path.exists() and path.with_name(f".{path.name}-old").exists():  # died mid-swap in save_checkpoint
        path = path.with_name(f".{path.name}-old")
    if not (path / "trainer_state.json").exists():
        raise FileNotFoundError(f"no PPO checkpoint in {path} (trainer_state.json missing)")
    meta = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    adapter_dir = path / "adapter" if meta["adapter"] == "default" else path / "adapter" / meta["adapter"]
    weights = load_peft_weights(str(adapter_dir), device=str(state.device))
    result = set_peft_model_state_dict(state.policy, weights, adapter_name=state.adapter)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{adapter_dir} does not match the policy's adapter: unexpected {result.unexpected_keys[:3]}")
    state.value_head.load_state_dict(torch.load(path / "value_head.pt", map_location=state.device, weights_only=True))
    state.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=state.device, weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    version, internal, gauss = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    np_state = meta["numpy_rng"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    state.kl_ctl.value, state.step = meta["kl_coef"], meta["step"]
    if meta["config"] != dataclasses.asdict(state.config):
        changed = [k for k, v in meta["config"].items() if dataclasses.asdict(state.config).get(k) != v]
        warnings.warn(f"resuming with a different PPOConfig than the checkpoint's (fields: {changed})")
    log = state.run_dir / "ppo_log.jsonl" if state.run_dir is not None else None
    if log is not None and log.exists():
        kept = [ln for ln in log.read_text(encoding="utf-8").splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= state.step]
        log.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")
    return state


def _run_dir(state: PPOState) -> Path:
    if state.run_dir is None:
        raise ValueError("no checkpoint path given and the state has no run_dir (pass run_dir= to setup)")
    return state.run_dir


def prompt_batch(prompts: list[str], step: int, batch_size: int, seed: int = 0) -> list[str]:
    """The prompts of PPO step ``step``: consecutive slices of seeded shuffles of ``prompts`` (one shuffle per
    pass over the data), so a resumed run sees exactly the batches an uninterrupted one would."""
    n, out = len(prompts), []
    for i in range(step * batch_size, (step + 1) * batch_size):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + i // n))
        out.append(prompts[int(perm[i % n])])
    return out


def train(state: PPOState, prompts: list[str], reward_fn: Callable[[list[str], list[str]], torch.Tensor],
          steps: int, *, checkpoint_every: int | None = None, progress: bool = True) -> list[dict[str, float]]:
    """Run PPO until ``state.step == steps`` (so it resumes from a loaded checkpoint): rollout, score, update.

    Saves ``run_dir/checkpoint`` every ``checkpoint_every`` steps and at the end. Returns this call's stats.
    """
    from tqdm.auto import tqdm

    if not prompts:
        raise ValueError("train() needs a non-empty list of prompts")
    if checkpoint_every and state.run_dir is None:
        raise ValueError("checkpoint_every needs a run folder: pass run_dir= to setup()")
    history = []
    bar = tqdm(total=steps, initial=state.step, desc="PPO", disable=not progress)
    while state.step < steps:
        batch = rollout(state, prompt_batch(prompts, state.step, state.config.batch_size, state.config.seed))
        stats = update(state, batch, score(state, batch, reward_fn))
        history.append(stats)
        bar.update(1)
        bar.set_postfix(score=f"{stats['objective/score']:.3f}", kl=f"{stats['objective/kl']:.2f}")
        if checkpoint_every and (state.step % checkpoint_every == 0 or state.step == steps):
            save_checkpoint(state)
    bar.close()
    return history
