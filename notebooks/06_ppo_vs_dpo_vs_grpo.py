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
# # 06 · PPO vs DPO vs GRPO on the same data: "why PPO?" answered with numbers
#
# <a href="https://colab.research.google.com/github/sawyer-workshop/sawyer/blob/main/notebooks/06_ppo_vs_dpo_vs_grpo.ipynb"><img src="https://colab.research.google.com/assets/colab-badge.svg" alt="Open In Colab"/></a>
#
# The workshop argues for PPO in words ("Trick 4 - PPO: so what the heck, Sinan?"). Here we measure. Three
# methods start from the **same SFT adapter** (notebook 02), keep a frozen copy of it as the reference, train the
# **same LoRA parameters**, and are judged by the **same reward model** (notebook 03) on the **same held-out
# prompts** as notebook 05:
#
# | method | learns from | needs | samples its own answers? |
# |---|---|---|---|
# | **PPO** (notebook 04) | dolly prompts, its own answers, scored by the reward model | reward model + value head | yes, one per prompt |
# | **DPO** (here) | notebook 03's *training* pairs (better, worse), as they are | nothing else: no reward model, no sampling | no |
# | **GRPO** (here) | dolly prompts, a *group* of its own answers per prompt, scored by the reward model | reward model | yes, several per prompt |
#
# DPO and GRPO run through TRL (`DPOTrainer`, `GRPOTrainer`); `sawyer.preference` supplies the data, the shared
# reward, the frozen SFT reference and the cost accounting.

# %% tags=["parameters"]
preset = "auto"       # "tiny" (CPU dry run), "t4" (free Colab T4), "a100"; "auto": tiny without a GPU, t4 with one
run_dir = "workshop"  # the run folder of notebooks 02-04 (runs/<run_dir>, or on Drive with use_drive)
use_drive = "auto"    # "auto": on Colab the run folder lives on Google Drive (as in 01-05); False: local
dpo_steps = None      # DPO optimiser steps (None: the preset's, PPO's budget)
grpo_steps = None     # GRPO steps (None: the preset's, as many sampled answers as PPO)
resume = True         # accepted like every notebook's; 06 keeps no checkpoint (a re-run trains again from SFT)
seed = 42

# %% [markdown]
# ## 0. Set-up
# On Colab, the next cell clones the course and installs the few pinned libraries Colab lacks
# (`requirements-colab.txt`: about 1-2 minutes on a fresh VM, instant after). It never replaces Colab's own
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

    colab_install("/content/sawyer/requirements-colab.txt")  # ~1-2 min on a fresh VM, instant after that

# %%
import contextlib
import dataclasses
import gc
import json

import pandas as pd
import torch
from IPython.display import Markdown, display

from sawyer import chat, data, evaluation, loading, plots, preference, runs, tokens
from sawyer.check import hub_login, preflight
from sawyer.presets import get_preset
from sawyer.reward import CrossEncoderReward, length_bias
from sawyer.workshop import finish_stage, resolve_run_dir

course = get_preset(preset)
preflight(course)
hub_login(course)
dpo_cfg = dataclasses.replace(course.dpo, seed=seed, **({} if dpo_steps is None else {"steps": int(dpo_steps)}))
grpo_cfg = dataclasses.replace(course.grpo, seed=seed, **({} if grpo_steps is None else {"steps": int(grpo_steps)}))
run = resolve_run_dir(run_dir, course.name, use_drive=use_drive)
stage = runs.start_stage(run, "06_preference", settings={"dpo": dataclasses.asdict(dpo_cfg),
                                                         "grpo": dataclasses.asdict(grpo_cfg), "seed": seed},
                         needs=("02_sft", "03_reward_model", "04_ppo"), resume=resume)
out = stage.folder
sft_adapter = run / "02_sft" / "adapter"
base_model = course.sft.base_model
torch.manual_seed(seed)
print(f"SFT adapter: {sft_adapter}\nreward model: {run / '03_reward_model' / 'model'}\nrun folder: {out}")

# %% [markdown]
# ## 1. The same data, split the same way
# - **DPO** gets notebook 03's comparison pairs, split by item with 03's seed: the *training* split only, the one
#   the reward model learned from. The held-out pairs (on which 03 measured the reward model) stay held out;
#   `dpo_examples` refuses any training pair whose question is also held out. Each pair becomes a SAWYER prompt
#   and two completions `... ###STOP###`, tokenised exactly as SFT's examples (no EOS appended).
# - **GRPO** gets notebook 04's training prompts, rebuilt with 04's code and seed; we check that the test half is
#   exactly `04_ppo/test_prompts.json`, the prompts notebook 05 (and section 5 here) evaluates on.

# %%
tokenizer = loading.load_tokenizer(sft_adapter)
pairs = data.load_comparisons(course.reward.comparison_file, max_items=course.reward.max_items)
train_pairs, held_out_pairs = data.split_by_group(pairs, "item", course.reward.eval_fraction, course.reward.seed)
dpo_examples, dpo_stats = preference.dpo_examples(train_pairs, tokenizer, dpo_cfg.max_seq_len,
                                                  held_out_pairs=held_out_pairs)
print(f"DPO: {len(train_pairs)} training pairs of 03 ({len(held_out_pairs)} held out, never used): {dpo_stats}")

grpo_prompts, test_prompts = preference.ppo_prompt_split(course.ppo, tokenizer)
saved_test = json.loads((run / "04_ppo" / "test_prompts.json").read_text())
if test_prompts != saved_test:
    raise RuntimeError("the rebuilt PPO split differs from 04_ppo/test_prompts.json: re-run notebook 04 with this "
                       "preset, or check that its data settings are unchanged")
print(f"GRPO: {len(grpo_prompts)} training prompts of 04; {len(test_prompts)} held-out test prompts (same as 04/05)")
ex = dpo_examples[0]
display(pd.DataFrame({"prompt": [tokenizer.decode(ex["prompt_ids"])[-80:]],
                      "chosen": [tokenizer.decode(ex["chosen_ids"])[:80]],
                      "rejected": [tokenizer.decode(ex["rejected_ids"])[:80]]}))

# %% [markdown]
# ## 2. DPO: the loss, derived
# PPO maximises the reward while staying near the reference $\pi_{\text{ref}}$ (the SFT model):
#
# $$ \max_\pi \; \mathbb{E}_{x,\, y \sim \pi}\big[r(x, y)\big] - \beta\, \mathrm{KL}\big(\pi(\cdot|x)\,\|\,\pi_{\text{ref}}(\cdot|x)\big). $$
#
# For a fixed $r$ this has a closed-form optimum (a Gibbs distribution): $\pi^*(y|x) = \frac{1}{Z(x)}\,
# \pi_{\text{ref}}(y|x)\, e^{r(x,y)/\beta}$, with $Z(x)$ summing over all answers (intractable). Take logs and
# solve for the reward:
#
# $$ r(x, y) = \beta \log \frac{\pi^*(y|x)}{\pi_{\text{ref}}(y|x)} + \beta \log Z(x). $$
#
# Notebook 03's Bradley-Terry model says $P(y_w \succ y_l \mid x) = \sigma\big(r(x, y_w) - r(x, y_l)\big)$. Plug
# the reward in: the intractable $\beta \log Z(x)$ is the same for both answers and **cancels**. Maximum
# likelihood on the preference pairs, with the policy $\pi_\theta$ in place of $\pi^*$, gives DPO's loss
# (Rafailov et al. 2023):
#
# $$ \mathcal{L}_{\text{DPO}} = -\log \sigma\Big(\beta \Big[\log \frac{\pi_\theta(y_w|x)}{\pi_{\text{ref}}(y_w|x)}
#    - \log \frac{\pi_\theta(y_l|x)}{\pi_{\text{ref}}(y_l|x)}\Big]\Big). $$
#
# So the "reward model" is implicit: $\hat r_\theta = \beta \log \pi_\theta / \pi_{\text{ref}}$ (TRL logs it as
# `rewards/chosen`, `rewards/rejected`, `rewards/margins`). Two things follow: the loss starts at
# $\log 2 = 0.693$ (policy = reference, margin 0), and **no answer is ever sampled**: DPO only re-weights the
# answers in the dataset. Below, `preference.dpo_loss` is the equation in code; TRL's `loss_type="sigmoid"`
# computes the same (checked in the tests).

# %%
print("margin 0 (policy = reference):", float(preference.dpo_loss(*torch.zeros(4, 1), beta=dpo_cfg.beta)[0]))
print("chosen up 2 nats, rejected down 2 nats:",
      float(preference.dpo_loss(torch.tensor([-8.0]), torch.tensor([-12.0]), torch.tensor([-10.0]),
                                torch.tensor([-10.0]), beta=dpo_cfg.beta)[0]))

# %% [markdown]
# ## 3. Train DPO
# The policy is the base (4-bit on a GPU) with the SFT adapter, trainable. TRL copies it into a second, frozen
# adapter named `ref` on the **same base weights** (`sync_reference` also copies the marker rows, which TRL's copy
# misses). Only LoRA trains, as in PPO; the marker rows keep their SFT values.
# **What to look for:** the loss leaving 0.693 and `rewards/margins` rising; with pairs this noisy (GPT-4 scores
# 1-10), a training accuracy well below 1 is normal.

# %%
print(f"DPO: beta {dpo_cfg.beta}, lr {dpo_cfg.learning_rate}, {dpo_cfg.steps} steps x {dpo_cfg.batch_size} pairs")
policy, tokenizer = tokens.load_adapter(base_model, sft_adapter, load_in_4bit=dpo_cfg.load_in_4bit, is_trainable=True)
sft_rows = preference.marker_rows(policy, tokenizer)  # the SFT marker rows: they must come back unchanged
dpo = preference.train_dpo(policy, tokenizer, dpo_examples, dpo_cfg, out / "dpo_trainer", progress=False)
preference.save_log(dpo["log"], out / "dpo_log.jsonl")
print(f"{dpo['steps']} steps; first loss {dpo['log'][0]['loss']:.3f}, last {dpo['log'][-1]['loss']:.3f}; "
      f"{dpo['cost']}")
display(plots.training_curves(dpo["log"], keys=("loss", "rewards/margins", "rewards/accuracies"),
                              path=out / "dpo_training.png", title="DPO training"))

# %% [markdown]
# Save only what changed (LoRA + marker rows, `sawyer.tokens.save_adapter`) and reload it: the logits must be the
# trained model's and the marker rows still SFT's.

# %%
dpo_bytes = tokens.save_adapter(policy, tokenizer, out / "dpo_adapter")
dpo_rt = preference.check_round_trip(policy, tokenizer, out / "dpo_adapter", base_model, sft_rows,
                                     load_in_4bit=dpo_cfg.load_in_4bit)
print(f"DPO adapter {tokens.format_bytes(dpo_bytes)}; reload: {dpo_rt}")
assert dpo_rt.ok, dpo_rt
del policy
gc.collect()
torch.cuda.empty_cache() if torch.cuda.is_available() else None

# %% [markdown]
# ## 4. GRPO: PPO without the value head
# For each prompt $x$, sample a group of $G$ answers, score each with the reward model, and use the score
# relative to its group as the advantage of every token of the answer:
#
# $$ A_i = \frac{r_i - \operatorname{mean}(r_1..r_G)}{\operatorname{std}(r_1..r_G)}, \qquad
#    \mathcal{L} = -\frac{1}{\sum_i |y_i|} \sum_{i,t} \Big[\min\big(\rho_{i,t} A_i,\;
#    \operatorname{clip}(\rho_{i,t}, 1 \pm \epsilon) A_i\big) - \beta\, \mathrm{KL}_{i,t}\Big], $$
#
# with $\rho_{i,t}$ the probability ratio to the sampling policy (as in PPO), and the KL to the SFT reference in
# the loss (TRL's per-token k3 estimator) rather than in the reward. The group mean replaces PPO's learned value
# function as the baseline (Shao et al. 2024), so there is no critic to train; the price is $G$ samples per prompt.
#
# The reward is **the same object class, folder and settings** as notebook 04's PPO reward
# (`CrossEncoderReward` on 03's model, questions extracted from the prompt the same way), wrapped by
# `GRPOReward`, which only converts TRL's call (`prompts`, `completions`) into PPO's and strips each answer as
# PPO's rollout does: an answer gets the score PPO would give it.

# %%
reward_fn = CrossEncoderReward.from_pretrained(run / "03_reward_model" / "model",
                                               batch_size=course.ppo.reward_batch_size,
                                               max_length=course.reward.max_length,
                                               question_from_prompt=chat.question_from_prompt)
grpo_reward = preference.GRPOReward(reward_fn)
assert grpo_reward.reward_fn is reward_fn
print(f"GRPO: group size {grpo_cfg.group_size} x {grpo_cfg.prompts_per_step} prompt(s) per step, {grpo_cfg.steps} "
      f"steps = {grpo_cfg.steps * grpo_cfg.group_size * grpo_cfg.prompts_per_step} sampled answers (PPO: "
      f"{course.ppo.steps * course.ppo.ppo.batch_size}); beta (KL) {grpo_cfg.beta}; lr {grpo_cfg.learning_rate}; "
      f"up to {grpo_cfg.max_new_tokens} new tokens at temperature {grpo_cfg.temperature}; loss '{grpo_cfg.loss_type}'")

# %% [markdown]
# **What to look for:** the mean reward of the groups trending up while the KL stays small. `frac_reward_zero_std`
# is the share of groups whose answers all scored the same: they carry no signal at all (advantage 0).

# %%
policy, tokenizer = tokens.load_adapter(base_model, sft_adapter, load_in_4bit=grpo_cfg.load_in_4bit, is_trainable=True)
grpo = preference.train_grpo(policy, tokenizer, grpo_prompts, grpo_reward, grpo_cfg, out / "grpo_trainer",
                             progress=False)
preference.save_log(grpo["log"], out / "grpo_log.jsonl")
print(f"{grpo['steps']} steps; {grpo['cost']}")
display(plots.training_curves(grpo["log"], keys=("reward", "kl", "completions/mean_length"),
                              path=out / "grpo_training.png", title="GRPO training"))
grpo_bytes = tokens.save_adapter(policy, tokenizer, out / "grpo_adapter")
grpo_rt = preference.check_round_trip(policy, tokenizer, out / "grpo_adapter", base_model, sft_rows,
                                      load_in_4bit=grpo_cfg.load_in_4bit)
print(f"GRPO adapter {tokens.format_bytes(grpo_bytes)}; reload: {grpo_rt}")
assert grpo_rt.ok, grpo_rt
del policy
gc.collect()
torch.cuda.empty_cache() if torch.cuda.is_available() else None

# %% [markdown]
# ## 5. Evaluate the four models exactly as notebook 05 does
# SFT, PPO, DPO and GRPO adapters side by side on one copy of the base weights; the same held-out prompts,
# the same sampling (temperature 0.7 from the same seed, `samples_per_prompt` answers each), the same reward model,
# the same statistics on each prompt's mean reward.

# %%
cfg = course.eval
model, tokenizer = tokens.load_adapter(base_model, sft_adapter, load_in_4bit=course.ppo.load_in_4bit)
for name, folder in {"ppo": run / "04_ppo" / "adapter", "dpo": out / "dpo_adapter",
                     "grpo": out / "grpo_adapter"}.items():
    model.load_adapter(str(folder), adapter_name=name)
MODELS = ("sft", "ppo", "dpo", "grpo")


@contextlib.contextmanager
def use(name):
    """Run the block as SFT, SFT+PPO, SFT+DPO or SFT+GRPO."""
    model.set_adapter({"sft": "default"}.get(name, name))
    yield


test_prompts = test_prompts[: cfg.n_test]
eval_reward = CrossEncoderReward.from_pretrained(run / "03_reward_model" / "model",
                                                 max_length=course.reward.max_length,
                                                 question_from_prompt=chat.question_from_prompt)
held_out = evaluation.answer_held_out(model, tokenizer, test_prompts, eval_reward, use, MODELS,
                                      samples=cfg.samples_per_prompt, max_new_tokens=cfg.max_new_tokens,
                                      batch_size=cfg.batch_size, stop_token_ids=chat.stop_token_ids(tokenizer),
                                      extract=chat.extract_reply, seed=cfg.seed, progress=False)
held_out.write_jsonl(out / "eval_rewards.jsonl")
answers, rewards, lengths = held_out.answers, held_out.rewards, held_out.lengths  # per prompt (sample means)
earlier = runs.read_metrics(run, "05_evaluation")
if earlier.get("reward_mean_ppo") is not None:
    print("same numbers as notebook 05 for SFT and PPO:",
          all(abs(earlier[f"reward_mean_{n}"] - float(rewards[n].mean())) < 1e-4 for n in ("sft", "ppo")))
display(pd.DataFrame({"prompt": [chat.question_from_prompt(p)[:50] for p in test_prompts],
                      **{name: [a[:60] for a in answers[name]] for name in MODELS}}).head(5))
display(evaluation.summary_table(rewards).round(3))
display(plots.reward_boxplot(rewards, path=out / "reward_boxplot.png", title="Reward by method (held-out prompts)"))

# %% [markdown]
# ## 6. Paired tests: each method against SFT, and DPO/GRPO against PPO
# The same prompts answered by every model, so the tests are paired (Wilcoxon signed-rank; bootstrap 95% CI of
# the mean difference; Cohen's $d_z$), as in notebook 05. "vs PPO" answers the question of this notebook: does
# the simpler method get as far as PPO on this reward?

# %%
comparisons = {"PPO vs SFT": ("sft", "ppo"), "DPO vs SFT": ("sft", "dpo"), "GRPO vs SFT": ("sft", "grpo"),
               "DPO vs PPO": ("ppo", "dpo"), "GRPO vs PPO": ("ppo", "grpo")}
tests = {label: evaluation.compare(rewards[a], rewards[b], paired=True, n_resamples=cfg.bootstrap_samples,
                                   seed=cfg.seed) for label, (a, b) in comparisons.items()}
for label, t in tests.items():
    print(f"{label}: " + evaluation.describe_change("reward", t))
display(pd.DataFrame({label: {"mean diff": t["bootstrap"]["diff"], "CI low": t["bootstrap"]["ci_low"],
                              "CI high": t["bootstrap"]["ci_high"], "Wilcoxon p": t["wilcoxon"]["p"],
                              "Cohen's d_z": t["effect_size"]["cohens_d"]}
                      for label, t in tests.items()}).T.round(4))

# %% [markdown]
# ## 7. Length and knowledge
# The reward model pays for length (notebook 03): a method can "win" by writing more. And none of the three
# should change what the model knows: the multiple-choice benchmarks of notebook 05 (log-likelihood protocol,
# 95% Wilson intervals).

# %%
bias = {name: length_bias(held_out.all_rewards[name], held_out.all_lengths[name]) for name in MODELS}
display(pd.DataFrame({name: {"mean length (words)": sum(lengths[name]) / len(lengths[name]),
                             "Spearman rho (reward, length)": bias[name]["spearman_rho"]}
                      for name in MODELS}).T.round(3))
benchmarks = {"truthful_qa mc1": data.load_truthful_qa_mc1(cfg.truthful_qa, n=cfg.max_questions, shuffle_seed=cfg.seed),
              "mmlu world_religions": data.load_mmlu(cfg.mmlu, subject="world_religions", n=cfg.max_questions)}
bench = {}
for bname, questions in benchmarks.items():
    for name in MODELS:
        with use(name):
            res = evaluation.score_choices_loglik(model, tokenizer, questions, batch_size=cfg.batch_size,
                                                  label=f"{bname} / {name}", progress=False)
        bench[f"{bname} | {name}"] = {f: res[f] for f in ("accuracy", "ci_low", "ci_high", "n")}
display(pd.DataFrame(bench).T.round(3))
display(plots.accuracy_bars(bench, path=out / "benchmarks.png"))

# %% [markdown]
# ## 8. What each method cost
# Wall time and peak memory of the *training* only (loading and evaluation excluded), the answers each method
# sampled, and how many times it called the reward model. PPO's numbers come from notebook 04's log (the sum of
# its per-step times) and its stage metrics (peak memory of the whole notebook, where recorded).
# DPO's column "samples generated" is 0 by construction; its hidden cost is elsewhere: it needs **pairs** of
# answers ranked by someone (the same pairs the reward model needed, and no more).

# %%
ppo_log = [json.loads(line) for line in (run / "04_ppo" / "ppo_log.jsonl").read_text().splitlines() if line.strip()]
ppo_metrics = runs.read_metrics(run, "04_ppo")
ppo_samples = len(ppo_log) * course.ppo.ppo.batch_size
ppo_peak = ppo_metrics.get("peak_gpu_reserved_gib", ppo_metrics.get("peak_cpu_rss_gib"))
cost = {
    "ppo": {"wall_s": round(sum(h.get(k, 0.0) for h in ppo_log for k in ("time/generate", "time/logprobs",
                                                                           "time/score", "time/train")), 2),
            "peak_memory_gib": None if ppo_peak is None else round(float(ppo_peak), 3),
            "memory_kind": "whole notebook 04" if ppo_peak is not None else "not recorded",
            "samples_generated": ppo_samples, "reward_model_calls": ppo_samples, "steps": len(ppo_log)},
    "dpo": {**dpo["cost"], "steps": dpo["steps"]},
    "grpo": {**grpo["cost"], "steps": grpo["steps"]},
}
display(pd.DataFrame(cost).T)

# %% [markdown]
# ## 9. The three-way comparison, and an honest reading

# %%
def row(name):
    """One line of the table; an empty cell where a comparison or a cost does not apply (SFT is the start)."""
    r = {"reward mean": round(float(rewards[name].mean()), 3),
         "mean length": round(sum(lengths[name]) / len(lengths[name]), 1)}
    for ref in ("SFT", "PPO"):
        t = tests.get(f"{name.upper()} vs {ref}")
        b = t["bootstrap"] if t else None
        r[f"vs {ref}: diff [95% CI]"] = f"{b['diff']:+.3f} [{b['ci_low']:+.3f}, {b['ci_high']:+.3f}]" if t else ""
        r[f"vs {ref}: Wilcoxon p"] = f"{t['wilcoxon']['p']:.3g}" if t else ""
    for bname in benchmarks:
        r[bname] = round(bench[f"{bname} | {name}"]["accuracy"], 3)
    c = cost.get(name, {})
    peak = c.get("peak_memory_gib")
    r.update({"train s": c.get("wall_s", ""), "peak GiB": "" if peak is None else peak,
              "samples generated": c.get("samples_generated", "")})
    return r


three_way = pd.DataFrame({name.upper(): row(name) for name in MODELS}).T
display(three_way)
(out / "three_way.md").write_text(preference.markdown_table(three_way))  # for the report

lines = []
for name in ("ppo", "dpo", "grpo"):
    lines.append(f"**{name.upper()} vs SFT.** " + evaluation.describe_change("reward", tests[f'{name.upper()} vs SFT']))
for name in ("dpo", "grpo"):
    t = tests[f"{name.upper()} vs PPO"]
    lines.append(f"**{name.upper()} vs PPO.** " + evaluation.describe_change("reward", t))
lines.append(f"**Cost.** Training took PPO {cost['ppo']['wall_s']:.0f} s, DPO {cost['dpo']['wall_s']:.0f} s, "
             f"GRPO {cost['grpo']['wall_s']:.0f} s; answers sampled: PPO {cost['ppo']['samples_generated']}, "
             f"DPO 0, GRPO {cost['grpo']['samples_generated']}.")
display(Markdown("\n\n".join(lines)))

# %% [markdown]
# **How to read this.**
# - **What DPO learns.** DPO raises the likelihood of the *dataset's* better answers relative to its worse ones
#   (GPT-4-era responses from other models), never of SAWYER's own. If SAWYER's answers look nothing like those
#   responses, DPO's updates push probability around answers SAWYER would not write anyway, and the reward of its
#   own samples may barely move, or move for reasons (length, style) the pairs happen to carry.
# - **What PPO and GRPO learn.** They score SAWYER's *own* samples, so every update is about answers SAWYER
#   actually gives: that is the case for on-policy RL. The price is generation (the slowest part on a GPU) and a
#   reward model that can be exploited: a rising reward with longer answers (section 7) is length bias at work, not
#   better answers. GRPO drops PPO's value head and pays with several samples per prompt.
# - **Reward is the reward model's opinion.** Every "better" above is measured by the same reward model that
#   PPO and GRPO optimised, so they are graded by their own teacher; DPO never saw it (it learned from the same
#   pairs the reward model learned from, which is the fair part). A fair referee would be a different judge
#   (people, or a stronger model), which this notebook does not have.
# - **What the numbers here do not show.** One seed, small budgets, a few dozen prompts: a difference whose
#   confidence interval includes 0 is no difference. On the `tiny` preset the models are toys trained for seconds
#   and the numbers only show that the pipeline runs; on `cpu`, `t4` or `a100` they begin to mean something, and even
#   then a ranking of the methods needs several seeds and the same budget tuned per method (each got PPO's
#   budget and a standard learning rate here, not its best).

# %%
def _test(t):
    b = t["bootstrap"]
    return {"mean_diff": b["diff"], "ci": [b["ci_low"], b["ci_high"]], "wilcoxon_p": t["wilcoxon"]["p"],
            "cohens_d": t["effect_size"]["cohens_d"]}


metrics = {"preset": course.name, "n_prompts": len(test_prompts), "samples_per_prompt": held_out.samples,
           **{f"reward_mean_{n}": float(rewards[n].mean()) for n in MODELS},
           **{f"reward_std_{n}": float(rewards[n].std(ddof=1)) for n in MODELS},
           **{f"mean_length_{n}": sum(lengths[n]) / len(lengths[n]) for n in MODELS},
           "tests": {label.lower().replace(" ", "_"): _test(t) for label, t in tests.items()},
           "cost": cost, "benchmarks": bench,
           "dpo": {"pairs": len(dpo_examples), "pair_stats": dpo_stats, "beta": dpo_cfg.beta,
                   "steps": dpo["steps"], "first_loss": dpo["log"][0]["loss"], "last_loss": dpo["log"][-1]["loss"],
                   "adapter_bytes": dpo_bytes, "round_trip_max_abs_logit_diff": dpo_rt.max_abs_logit_diff,
                   "marker_rows_intact": dpo_rt.marker_rows_equal_sft},
           "grpo": {"train_prompts": len(grpo_prompts), "group_size": grpo_cfg.group_size, "beta": grpo_cfg.beta,
                    "steps": grpo["steps"], "first_reward": grpo["log"][0]["reward"],
                    "last_reward": grpo["log"][-1]["reward"], "adapter_bytes": grpo_bytes,
                    "round_trip_max_abs_logit_diff": grpo_rt.max_abs_logit_diff,
                    "marker_rows_intact": grpo_rt.marker_rows_equal_sft},
           "summary": " ".join(lines)}
finish_stage(run, "06_preference", metrics)
metrics
