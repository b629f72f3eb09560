"""Tests of sawyer.runs and sawyer.checkpoints: run folders, DONE markers, fingerprints, locks, checkpoints.

A killed and resumed PPO run must match an uninterrupted one exactly; every damaged file gives an error that
names it. Everything runs on the tiny models (CPU, offline) with fixed seeds.
"""
import json

import torch
from test_ppo import DESIGN_STATS, lora_params, make_policy, prompts_for, word_reward

from sawyer import checkpoints, ppo
from sawyer.ppo import PPOConfig


# ----------------------------------------------------------------------------- checkpoint and resume
def test_resume_gives_the_same_parameters_and_stats(tmp_path):
    cfg = PPOConfig(learning_rate=5e-3, mini_batch_size=4, kl_coef=0.1, kl_target=0.5, kl_horizon=100,
                    max_new_tokens=8, gradient_checkpointing=False)
    prompts, reward = prompts_for("llama", 10), word_reward("the")

    policy, tok = make_policy("llama")
    straight = ppo.setup(policy, tok, cfg, run_dir=tmp_path / "straight")
    history = checkpoints.train(straight, prompts, reward, steps=4, progress=False)

    policy, tok = make_policy("llama")
    first = ppo.setup(policy, tok, cfg, run_dir=tmp_path / "resumed")
    checkpoints.train(first, prompts, reward, steps=2, checkpoint_every=2, progress=True)  # the tqdm bar too
    with open(tmp_path / "resumed" / "ppo_log.jsonl", "a") as f:  # a step that ran but was never checkpointed
        f.write(json.dumps({"step": 3, "objective/score": -1.0}) + "\n")
    policy, tok = make_policy("llama", seed=123)  # different LoRA init: everything must come from the checkpoint
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


