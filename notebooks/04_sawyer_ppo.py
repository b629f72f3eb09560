# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · SAWYER PPO: reinforcement learning from the reward model's feedback
#
# <a href="https://colab.research.google.com/github/sawyer-workshop/sawyer/blob/main/notebooks/04_sawyer_ppo.ipynb"><img src="https://colab.research.google.com/assets/colab-badge.svg" alt="Open In Colab"/></a>
#
# SAWYER (notebook 02) can hold a conversation. The reward model (notebook 03) can say which answers people
# prefer. PPO closes the loop: SAWYER answers **new** prompts (dolly instructions it never saw), the reward
# model scores each answer, and PPO shifts SAWYER towards higher-scoring answers, while a KL penalty keeps it
# close to the SFT model it started from.
#
# **Why a separate reward model?** PPO needs a score for every *sampled* answer, including answers nobody has
# ever rated; a learned reward model generalises the human (here GPT-4) judgements to them. DPO skips the reward
# model and the sampling: it trains directly on the preference pairs with a closed-form loss. Simpler and
# cheaper, but it can only learn from answers in the dataset, never from the model's own attempts.

# %% tags=["parameters"]
preset = "auto"       # "tiny" (CPU dry run), "t4" (free Colab T4), "a100"; "auto": tiny without a GPU, t4 with one
run_dir = "workshop"  # the run folder of notebooks 02 and 03 (runs/<run_dir>, or on Drive with use_drive)
use_drive = "auto"    # "auto": on Colab the run folder lives on Google Drive (survives a disconnect); False: local
steps = None          # PPO steps (None: the preset's); the knob that decides the time on a T4
resume = True         # continue from run_dir/04_ppo/checkpoint if interrupted (only if nothing it was built from changed)
plot_every = 2        # redraw the live curves every N steps
seed = 42
sft_from_hub = None   # a hub repo id holding a finished 02_sft stage (if your notebook 02 failed)
reward_model_from_hub = None  # likewise for 03_reward_model
push_to_hub = None    # a hub repo id to publish the finished PPO adapter to (write token)

# %% [markdown]
# ## 0. Set-up
# On Colab, the next cell clones the course and installs the few pinned libraries Colab lacks
# (`requirements-colab.txt`: a few minutes on a fresh VM, instant after). It never replaces Colab's own
# numpy, pandas or torch; if a library Colab had already loaded must change, it restarts the runtime itself
# and says so: then run all cells again.

# %%
import os, subprocess, sys  # noqa: E401

if "google.colab" in sys.modules:  # Colab: clone the course once per VM, install only what Colab lacks
    if not os.path.isdir("/content/sawyer"):
        subprocess.run(["git", "clone", "-q", "--depth", "1", "https://github.com/sawyer-workshop/sawyer",
                        "/content/sawyer"], check=True)
    sys.path.insert(0, "/content/sawyer")
    from sawyer.colab_install import colab_install

    colab_install("/content/sawyer/requirements-colab.txt")  # minutes on a fresh VM, instant after that

# %%
import dataclasses
import json

import pandas as pd
import torch
from IPython.display import clear_output, display

from sawyer import chat, checkpoints, data, loading, plots, ppo, runs, tokens
from sawyer.check import hub_login, preflight
from sawyer.presets import get_preset
from sawyer.reward import CrossEncoderReward
from sawyer.workshop import finish_stage, resolve_run_dir

course = get_preset(preset)
preflight(course)
hub_login(course)
cfg = course.ppo
if steps is not None:
    cfg = dataclasses.replace(cfg, steps=int(steps))
run = resolve_run_dir(run_dir, course.name, use_drive=use_drive)
# stages 02/03 from the hub when asked for (sft_from_hub, reward_model_from_hub); then
from sawyer import hub  # noqa: E402
hub.pull_stages(run, {"02_sft": sft_from_hub, "03_reward_model": reward_model_from_hub})
# the stage: locked, DONE removed until it finishes; it records which 02/03 outputs it is built from, and a
# checkpoint is resumed only if those and the settings are unchanged (sawyer.runs)
stage = runs.start_stage(run, "04_ppo", settings={**dataclasses.asdict(cfg), "seed": seed}, resume=resume,
                         needs=("02_sft", "03_reward_model"), ignore=("steps", "checkpoint_every", "sample_every"))
out = stage.folder
sft_adapter = run / "02_sft" / "adapter"
print(f"SFT adapter: {sft_adapter}\nreward model: {run / '03_reward_model' / 'model'}\nrun folder: {out}")

# %%
from IPython.display import Markdown

from sawyer import evaluation, sft

if banner := evaluation.banner(course.name):  # on `tiny`: say once, visibly, what its numbers can and cannot mean
    display(Markdown(banner))

# %% [markdown]
# ## 1. Prompts: dolly instructions as SAWYER human turns
# Instruction, plus its context paragraph when there is one, formatted as `###HUMAN### ... ###BOT###`.
# Prompts longer than the limit are dropped (and counted): long prompts leave little room to answer and
# dominate the memory of a batch. A held-out test split is saved for notebook 05.

# %%
tokenizer = loading.load_tokenizer(sft_adapter)
raw = data.load_dolly_prompts(cfg.dataset, n=cfg.n_prompts, seed=cfg.seed)
formatted = [chat.format_prompt(p) for p in raw]
kept = [p for p in formatted if len(tokenizer(p)["input_ids"]) < cfg.max_prompt_tokens]
print(f"{len(formatted)} prompts, {len(formatted) - len(kept)} dropped as >= {cfg.max_prompt_tokens} tokens")
train_prompts, test_prompts = data.split(kept, cfg.n_test / len(kept), cfg.seed)
(out / "test_prompts.json").write_text(json.dumps(test_prompts, indent=1))
print(f"{len(train_prompts)} training prompts, {len(test_prompts)} held-out test prompts\n{train_prompts[0]}")

# %% [markdown]
# ## 2. Policy, reference and reward
# - **Policy:** the base model (4-bit on a GPU) with SAWYER's SFT adapter, now *trainable*.
# - **Reference:** the SFT model. We load the same SFT adapter a second time as a **frozen** adapter on the
#   *same* base weights, so the reference costs a few MB instead of a second copy of the model
#   (the original kept a full copy).
# - **Reward:** notebook 03's cross-encoder, scoring (question, answer) **text** with its own tokenizer.
# - **Value head:** one linear layer on the policy's last hidden state that predicts the return; PPO's
#   advantages are "how much better than the value head expected".

# %%
policy, tokenizer = tokens.load_adapter(course.sft.base_model, sft_adapter, load_in_4bit=cfg.load_in_4bit,
                                        is_trainable=True)
ref_adapter = ppo.add_frozen_reference_adapter(policy, sft_adapter)
reward_fn = CrossEncoderReward.from_pretrained(run / "03_reward_model" / "model", batch_size=cfg.reward_batch_size,
                                               max_length=course.reward.max_length,
                                               question_from_prompt=chat.question_from_prompt)
state = ppo.setup(policy, tokenizer, dataclasses.replace(cfg.ppo, seed=seed), ref_adapter=ref_adapter,
                  run_dir=out, stop_token_ids=chat.stop_token_ids(tokenizer))
print(loading.memory_report())

# %% [markdown]
# ## 3. Resume an interrupted run
# Every `checkpoint_every` steps the adapter, value head, optimiser, KL controller, random-number state and
# step counter are written to `04_ppo/checkpoint` (atomically: a crash mid-write leaves the old one intact).
# If Colab disconnected, re-run the notebook with the same `run_dir`: this cell picks up where it stopped,
# and the loop below continues from `state.step`.

# %%
if stage.resume and checkpoints.has_checkpoint(out / "checkpoint"):
    checkpoints.load_checkpoint(state, out / "checkpoint")
    print(f"resumed at step {state.step}")
else:
    print("starting from step 0")
history = runs.read_log(out / "ppo_log.jsonl", max_step=state.step)  # the steps already done, if any

# %% [markdown]
# ## 4. The PPO loop
#
# The reward model scores *text*: nothing differentiable connects its logit to SAWYER's weights. The policy
# gradient does not need one (notebook 01, section 5, derives it): by the log-derivative trick
# $\nabla_\theta \mathbb{E}_{y\sim\pi_\theta}[r] = \mathbb{E}_{y\sim\pi_\theta}[r\,\nabla_\theta \log\pi_\theta(y)]$, so sampling an answer,
# scoring it and raising the log-probability of its tokens in proportion to the advantage is enough (REINFORCE);
# PPO adds the clipped ratio and the KL penalty.
#
# One step = **rollout -> score -> update**:
# 1. `rollout`: sample an answer for each of 8 prompts (batched, temperature 1, no top-k/top-p, because the
#    training pass must compute the log-probs of the very distribution that sampled), and record the
#    log-probs under the policy and the reference, and the value head's estimates;
# 2. `score`: the reward model's logit for each (question, answer);
# 3. `update`: the score is first *shaped*: normalised by running statistics (mean 0, std 1 over every score so
#    far; raw logits sit far from the value head's starting 0), clipped to $\pm 3$, and lowered by 1 for an
#    answer cut off at the length limit without `###STOP###` (rambling must not pay); then the per-token reward
#    $-\beta(\log\pi - \log\pi_{\text{ref}})$ plus the shaped score on the last token; GAE advantages; then PPO
#    epochs of the clipped objective on minibatches. An answer that starts a new `###HUMAN###` turn ends there.
#
# **The KL coefficient $\beta$, honestly:** the "adaptive" controller multiplies $\beta$ by at most
# $1 \pm 0.2 \cdot 8/10000$ per step at batch 8, i.e. 0.016%. Over the original's 450 steps $\beta$ stayed
# within 0.186-0.215. It does not steer the KL towards its target at this scale; it is a fixed $\beta$ with a
# slow drift. The plot shows $\beta$ (`objective/kl_coef`) next to the KL so you can see it.
#
# **What the KL term protects:** without it, the policy would drift to whatever the reward model over-rates
# (for this one: length, see notebook 03) and forget how to hold a conversation. **What to look for:** the
# score trending up while the KL grows slowly; a KL that explodes with a score that jumps means the policy
# found a hole in the reward model, not better answers.

# %%
samples = []
for step in range(state.step, cfg.steps):
    prompts = checkpoints.prompt_batch(train_prompts, step, state.config.batch_size, seed)
    batch = ppo.rollout(state, prompts)                # 1. sample answers, log-probs, reference, values
    scores = ppo.score(state, batch, reward_fn)        # 2. the reward model's score, on text
    stats = ppo.update(state, batch, scores)           # 3. KL-penalised rewards, GAE, clipped PPO update
    history.append(stats)
    if state.step % cfg.sample_every == 0:
        samples += [{"step": state.step, "prompt": chat.question_from_prompt(p)[:60], "answer": r[:100],
                     "score": round(float(s), 2)} for p, r, s in zip(batch.prompts[:3], batch.responses, scores)]
    if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps:
        checkpoints.save_checkpoint(state, out / "checkpoint")
    if state.step % plot_every == 0 or state.step == cfg.steps:
        clear_output(wait=True)
        print(f"step {state.step}/{cfg.steps}: score {stats['objective/score']:.3f}, KL {stats['objective/kl']:.3f},"
              f" beta {stats['objective/kl_coef']:.3f}")
        display(plots.training_curves(history, keys=("objective/score", "objective/kl", "objective/kl_coef",
                                                     "response/length"), path=out / "training_curves.png"))
        display(pd.DataFrame(samples[-6:]))

# %% [markdown]
# ## 5. What PPO logged
# Every step's statistics are in `04_ppo/ppo_log.jsonl` (`sawyer.plots.redraw_run` redraws all figures from
# such logs). `policy/clipfrac` above ~0.2 means steps are too big; `val/explained_variance` near 1 means the
# value head predicts the returns well (it starts near 0, and stays there if the head cannot tell good answers
# from bad ones before they are written: on `tiny` it has only a handful of steps); `response/truncated` is the
# share of answers cut off by the length limit.

# %%
log = pd.DataFrame(history).set_index("step")
display(log[["objective/score", "objective/shaped_score", "objective/kl", "objective/kl_coef", "policy/clipfrac",
             "policy/approx_kl", "val/explained_variance", "response/length", "response/truncated", "time/generate",
             "time/train"]].round(3).tail(10))
display(plots.training_curves(history, keys=("policy/clipfrac", "policy/approx_kl", "loss/value",
                                             "val/explained_variance"), path=out / "ppo_diagnostics.png"))

# %% [markdown]
# ### Aside: from the reward model to DPO in three lines
# The KL-regularised objective $\max_\pi \mathbb{E}_{y\sim\pi}[r(x,y)] - \beta\,\mathrm{KL}(\pi\,\|\,\pi_{\text{ref}})$ that PPO
# climbs step by step has a closed-form optimum (Rafailov et al. 2023):
#
# $$ \pi^*(y\mid x) = \frac{1}{Z(x)}\,\pi_{\text{ref}}(y\mid x)\, e^{r(x,y)/\beta} \quad\Longleftrightarrow\quad r(x,y) = \beta \log\frac{\pi^*(y\mid x)}{\pi_{\text{ref}}(y\mid x)} + \beta \log Z(x). $$
#
# Put that reward into notebook 03's Bradley-Terry loss: $\beta\log Z(x)$ is the same for both answers to one
# question and cancels in the difference, leaving a loss on the policy itself, with no reward model and no sampling:
#
# $$ \mathcal{L}_{\text{DPO}} = -\log\sigma\Big(\beta \log\frac{\pi_\theta(y_w\mid x)}{\pi_{\text{ref}}(y_w\mid x)} - \beta \log\frac{\pi_\theta(y_l\mid x)}{\pi_{\text{ref}}(y_l\mid x)}\Big). $$
#
# The price: DPO learns only from the answers in the preference data, never from SAWYER's own attempts, and it
# trusts the Bradley-Terry model exactly; PPO can explore, and pays for it with sampling and a reward model.

# %% [markdown]
# ## 6. Save the PPO adapter for notebook 05 and the chat app
# Only the trainable adapter (the reference adapter is dropped first), with the marker rows and tokenizer.

# %%
policy.delete_adapter(ref_adapter)
adapter_bytes = tokens.save_adapter(policy, tokenizer, out / "adapter")
print(f"PPO adapter: {tokens.format_bytes(adapter_bytes)} in {out / 'adapter'}")
k = max(1, len(history) // 4)
first = sum(h["objective/score"] for h in history[:k]) / k
last = sum(h["objective/score"] for h in history[-k:]) / k
print(f"mean training score, first {k} step(s): {first:.3f}; last {k} step(s): {last:.3f}")
metrics = {"preset": course.name, "steps": state.step, "train_prompts": len(train_prompts),
           "test_prompts": len(test_prompts), "train_score_first": first, "train_score_last": last,
           "final_kl": history[-1]["objective/kl"], "final_kl_coef": history[-1]["objective/kl_coef"],
           "seconds_per_step": sum(h["time/generate"] + h["time/logprobs"] + h["time/score"] + h["time/train"]
                                   for h in history)
           / len(history), "adapter_bytes": adapter_bytes}
finish_stage(run, "04_ppo", metrics)
if push_to_hub:  # publish the finished stage (needs a write token: HF_TOKEN)
    hub.push_stage(run, "04_ppo", push_to_hub)
metrics

# %% [markdown]
# ## Your turn
# **1. Ask SAWYER+RL your own question.** The policy in memory is now the PPO model.

# %%
my_question = "How do I make my houseplants grow faster?"  # <- your question
print(sft.generate(policy, tokenizer, [my_question], max_new_tokens=64)[0].reply)

# %% [markdown]
# **2. Spot the reward hacking.** The sampled answers with the highest scores during training, with their length:
# are they better answers, or only longer / more repetitive ones the reward model over-rates (notebook 03)?

# %%
best = sorted(samples, key=lambda s: -s["score"])[:5]
display(pd.DataFrame([{**s, "words": len(s["answer"].split())} for s in best]))

# %% [markdown]
# **3. Loosen or tighten the leash.** Re-run this notebook with another `run_dir` (so this run is kept) and, in
# the set-up cell, `cfg = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, kl_coef=0.02, adaptive_kl=False))`
# (or `kl_coef=1.0`). Compare `objective/kl` and the answers with this run's. The settings this run used:

# %%
print({k: getattr(state.config, k) for k in ("kl_coef", "adaptive_kl", "kl_target", "cliprange", "learning_rate",
                                              "batch_size", "ppo_epochs", "temperature", "max_new_tokens")})
