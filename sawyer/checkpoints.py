"""PPO checkpoints and the training loop: save, load (resume), the prompts of each step, ``train``.

Kept out of ``sawyer.ppo`` so ``ppo.py`` holds only the algorithm. The rules of the run folder (atomic swap, crash recovery, named errors for damaged
files, a full disk, torn log lines) come from ``sawyer.runs``.

What a checkpoint folder holds, and why each piece is needed for a resume that matches an uninterrupted run
bit for bit::

    adapter/             the trainable LoRA weights (PEFT format; marker rows are not trained in PPO)
    value_head.pt        the value head
    optimizer.pt         AdamW's moments (without them the first steps after a resume take different sizes)
    rng.pt               torch (CPU and CUDA) random states: the next rollout samples the same tokens
    trainer_state.json   ppo.training_state(): step, KL coefficient, running score statistics, loss scale;
                         plus Python/NumPy random states and the PPOConfig it ran with
"""
from __future__ import annotations

import dataclasses
import json
import random
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from sawyer import runs
from sawyer.ppo import PPOState, rollout, score, update
from sawyer.ppo_math import RunningMoments


def training_state(state: PPOState) -> dict:
    """Everything a bit-exact resume needs besides adapter weights, value head and optimiser (JSON-safe).

    The step, the KL coefficient, the running score statistics and the fp16 loss scale. A checkpoint stores
    this dict; ``restore_training_state`` puts it back.
    """
    return {"step": state.step, "kl_coef": state.kl_ctl.value, "score_stats": dataclasses.asdict(state.score_stats),
            "grad_scaler": state.scaler.state_dict() if state.scaler is not None and state.scaler.is_enabled()
            else {}}


def restore_training_state(state: PPOState, d: dict) -> PPOState:
    """Put back what ``training_state`` returned (into a state built by ``setup`` with the same config)."""
    state.step, state.kl_ctl.value = int(d["step"]), float(d["kl_coef"])
    state.score_stats = RunningMoments(**d.get("score_stats", {}))
    if d.get("grad_scaler") and state.scaler is not None and state.scaler.is_enabled():
        state.scaler.load_state_dict(d["grad_scaler"])
    return state


def save_checkpoint(state: PPOState, path: str | Path | None = None) -> Path:
    """Write everything a resume needs to ``path`` (default ``run_dir/checkpoint``), all-or-nothing.

    Written into a temporary folder, then swapped in (``runs.atomic_folder``): a crash at any moment leaves
    the previous complete checkpoint. A full disk raises ``runs.DiskFull`` (the previous one stays intact).
    """
    path = Path(path) if path is not None else _run_dir(state) / "checkpoint"
    with runs.atomic_folder(path) as tmp:
        state.policy.save_pretrained(tmp / "adapter", selected_adapters=[state.adapter], save_embedding_layers=False)
        torch.save(state.value_head.state_dict(), tmp / "value_head.pt")
        torch.save(state.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, tmp / "rng.pt")
        np_state = np.random.get_state()
        meta = {**training_state(state), "adapter": state.adapter, "config": dataclasses.asdict(state.config),
                "python_rng": random.getstate(), "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
        (tmp / "trainer_state.json").write_text(json.dumps(meta), encoding="utf-8")
    return path


def has_checkpoint(path: str | Path) -> bool:
    """Whether the checkpoint folder ``path`` exists, after repairing what a crash mid-save can leave
    (``runs.recover``). Written all-or-nothing, so a folder with a file missing is damaged: loading says so."""
    return runs.recover(Path(path)) is not None


def load_checkpoint(state: PPOState, path: str | Path | None = None) -> PPOState:
    """Restore a checkpoint written by ``save_checkpoint`` into ``state`` (built by ``setup`` as before).

    A crash mid-save is repaired first (``.checkpoint-old`` put back). A truncated or corrupt file raises
    ``runs.DamagedFile`` naming it. Lines of ``run_dir/ppo_log.jsonl`` from steps after the checkpoint (a run
    that went on and then died) are dropped, as is a torn last line, so the log continues cleanly.
    """
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    path = Path(path) if path is not None else _run_dir(state) / "checkpoint"
    if not has_checkpoint(path):
        raise FileNotFoundError(f"no PPO checkpoint folder {path}")
    fix = f"delete {path} or set resume=False"
    meta = runs.read_json(path / "trainer_state.json", fix)
    adapter_dir = path / "adapter" if meta["adapter"] == "default" else path / "adapter" / meta["adapter"]
    with runs.reading(adapter_dir / "adapter_model.safetensors", fix):
        (adapter_dir / "adapter_model.safetensors").open("rb").close()  # missing: say so (peft would try the hub)
        weights = load_peft_weights(str(adapter_dir), device=str(state.device))
    result = set_peft_model_state_dict(state.policy, weights, adapter_name=state.adapter)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{adapter_dir} does not match the policy's adapter: unexpected {result.unexpected_keys[:3]}")
    state.value_head.load_state_dict(runs.torch_load(path / "value_head.pt", fix, map_location=state.device))
    state.optimizer.load_state_dict(runs.torch_load(path / "optimizer.pt", fix, map_location=state.device))
    rng = runs.torch_load(path / "rng.pt", fix)
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    version, internal, gauss = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    np_state = meta["numpy_rng"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    restore_training_state(state, meta)
    if meta["config"] != dataclasses.asdict(state.config):
        changed = [k for k, v in meta["config"].items() if dataclasses.asdict(state.config).get(k) != v]
        warnings.warn(f"resuming with a different PPOConfig than the checkpoint's (fields: {changed})")
    if state.run_dir is not None:
        runs.read_log(state.run_dir / "ppo_log.jsonl", max_step=state.step)
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


# --------------------------------------------------------------------------- any torch training loop
def save_training_checkpoint(path: str | Path, model, optimizer, *, scheduler=None, scaler=None,
                             extra: dict | None = None) -> Path:
    """Checkpoint a plain torch training loop (the reward model's): all-or-nothing, like ``save_checkpoint``.

    ``model.safetensors`` (the trainable model's weights), ``optimizer.pt`` (+ scheduler and loss scaler),
    ``rng.pt`` (torch CPU/CUDA random states, for dropout) and ``trainer_state.json`` (``extra``: the step
    and whatever the loop needs to continue exactly, e.g. running averages since the last log line).
    """
    from safetensors.torch import save_model

    path = Path(path)
    with runs.atomic_folder(path) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None},
                   tmp / "optimizer.pt")
        torch.save({"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(extra or {}), encoding="utf-8")
    return path


def load_training_checkpoint(path: str | Path, model, optimizer, *, scheduler=None, scaler=None) -> dict:
    """Restore what ``save_training_checkpoint`` wrote (repairing a crash mid-save first); returns ``extra``.

    A truncated or corrupt file raises ``runs.DamagedFile`` naming it and the fix.
    """
    from safetensors.torch import load_model

    path = Path(path)
    if not has_checkpoint(path):
        raise FileNotFoundError(f"no training checkpoint folder {path}")
    fix = f"delete {path} or set resume=False"
    extra = runs.read_json(path / "trainer_state.json", fix)
    with runs.reading(path / "model.safetensors", fix):
        load_model(model, str(path / "model.safetensors"), device=str(next(model.parameters()).device))
    opt = runs.torch_load(path / "optimizer.pt", fix, map_location=next(model.parameters()).device)
    optimizer.load_state_dict(opt["optimizer"])
    if scheduler is not None and opt["scheduler"] is not None:
        scheduler.load_state_dict(opt["scheduler"])
    if scaler is not None and opt["scaler"] is not None:
        scaler.load_state_dict(opt["scaler"])
    rng = runs.torch_load(path / "rng.pt", fix)
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return extra


def interval(total_steps: int, checkpoints: int = 10) -> int:
    """A checkpoint interval giving about ``checkpoints`` checkpoints over a run (at least every step)."""
    return max(1, -(-int(total_steps) // checkpoints))


# --------------------------------------------------------------------------- checkpoints others write (HF Trainer)
def check_files(folder: str | Path, fix: str) -> None:
    """Raise ``runs.DamagedFile`` for the first truncated or corrupt file in ``folder`` (cheap checks only).

    JSON must parse; a safetensors file must be as long as its header says; a torch ``.pt``/``.pth``/``.bin``
    file is a zip archive whose CRCs must match. Nothing is unpickled.
    """
    import zipfile

    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file():
            continue
        with runs.reading(path, fix):
            if path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix == ".safetensors":
                with path.open("rb") as f:
                    n = int.from_bytes(f.read(8), "little")
                    header = json.loads(f.read(n))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                if path.stat().st_size < 8 + n + end:
                    raise EOFError(f"{path.stat().st_size} bytes, the header needs {8 + n + end}")
            elif path.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(path) as z:
                    bad = z.testzip()
                    if bad is not None:
                        raise ValueError(f"bad CRC in {bad}")


def last_trainer_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete ``checkpoint-N`` folder a ``transformers.Trainer`` wrote to ``output_dir``, checked.

    A folder without ``trainer_state.json`` (the Trainer writes it last: the run was killed mid-save) is
    skipped with a warning; a complete-looking one with a damaged file raises ``runs.DamagedFile``.
    """
    found = sorted((p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for path in found:
        if not (path / "trainer_state.json").exists():
            warnings.warn(f"{path} is incomplete (the run died while saving it): skipped")
            continue
        check_files(path, f"delete {path} or set resume=False")
        return path
    return None
