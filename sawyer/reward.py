"""Rewards: off-the-shelf classifier logits (notebook 01) and the SAWYER cross-encoder reward model (03-05).

Every reward here is a ``reward_fn(prompts: list[str], responses: list[str]) -> Tensor`` of shape ``(B,)``,
float32, on the CPU: PPO (``sawyer.ppo``) only ever sees text, so the reward model may use its own tokenizer.

**Raw logits, not probabilities.** A softmax probability saturates: 0.98 and 0.999 look alike, so the policy
gets almost no signal once a classifier is confident. The logit keeps growing with the evidence and is
centred near 0, the scale PPO's value head learns easily (the workshop used raw logits too).

**Cross-encoder vs bi-encoder.** A bi-encoder embeds question and answer separately and compares the two
vectors (fast retrieval, but the texts never see each other). A cross-encoder reads them *together*,
``[CLS] question [SEP] answer [SEP]``, so every layer's attention relates answer words to question words;
one linear head (``num_labels=1``) turns the result into a scalar score. Slower, much better at judging.

**Bradley-Terry pairwise loss.** People (or GPT-4) rarely give calibrated absolute scores, but they can say
which answer is better. Bradley-Terry models ``P(better beats worse) = sigmoid(r_better - r_worse)``; the
loss is ``-log sigmoid(r_better - r_worse - margin)`` (InstructGPT, Ouyang et al. 2022; the margin is
Llama 2's, Touvron et al. 2023). With ``margin = score difference`` a pair scored 9 vs 2 must be separated
by about 7 logits before its loss fades, a 6 vs 5 pair by 1: strong preferences push harder. Only
differences matter, so the reward's offset is arbitrary (compare rewards, do not read them absolutely).

**Length bias.** Longer answers are often better in the training data, so the model can learn "long = good"
(the original SAWYER reward model did). PPO then exploits it with rambling answers. ``length_bias``
measures it: the correlation of reward with length, on answers of one question set.
"""
from __future__ import annotations

import itertools
import json
import math
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F

from sawyer.loading import compute_dtype, load_classifier, load_tokenizer

if TYPE_CHECKING:
    from sawyer.presets import RewardConfig, SummaryConfig

RewardFn = Callable[[Sequence[str], Sequence[str]], torch.Tensor]


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _autocast(dev: torch.device):
    """Autocast to ``compute_dtype()`` (``sawyer.loading.precision``: bf16 on A100/H100, fp16 on a T4), plain fp32
    on the CPU. Keyed on the dtype, not the device, so a test can run the fp16 path on the CPU."""
    dtype = compute_dtype()
    return nullcontext() if dtype == torch.float32 else torch.autocast(dev.type, dtype=dtype)


# --------------------------------------------------------------------------- classifier rewards (notebook 01)
def label_index(config, label: str, model_name: str = "model") -> int:
    """The logit column of ``label`` (e.g. ``"LABEL_1"``), looked up by name in ``config.label2id``."""
    label2id = dict(getattr(config, "label2id", None) or {})
    if label not in label2id:
        raise ValueError(f"{model_name!r} has no label {label!r}; available labels: {sorted(label2id)}")
    return int(label2id[label])


def combine_logits(logits_by_component: dict[str, torch.Tensor], label_index: dict[str, int],
                   weights: dict[str, float]) -> torch.Tensor:
    """``sum_k weights[k] * logits[k][:, label_index[k]]``: the weighted sum of each component's chosen logit.

    ``logits_by_component[k]`` is ``(B, n_labels_k)``; the result is ``(B,)`` float32.
    """
    if not (set(logits_by_component) == set(label_index) == set(weights)):
        raise ValueError(f"components differ: logits {sorted(logits_by_component)}, labels {sorted(label_index)}, "
                       f"weights {sorted(weights)}")
    return sum(weights[k] * logits[:, label_index[k]].float() for k, logits in logits_by_component.items())  # (B,)


class ClassifierReward:
    """One text classifier's logit for one label, scored on the *response* text (the prompt is ignored).

    ``ClassifierReward("textattack/roberta-base-CoLA", "LABEL_1")`` rewards grammatical answers. Calling it
    returns ``weight * logit``; ``score(texts)`` returns the raw logit.
    """

    def __init__(self, model_name: str, label: str, weight: float = 1.0, batch_size: int = 32,
                 max_length: int = 512, *, name: str | None = None, model=None, tokenizer=None):
        self.model = (load_classifier(model_name) if model is None else model).eval()
        self.tokenizer = load_tokenizer(model_name) if tokenizer is None else tokenizer
        self.label, self.weight, self.batch_size, self.max_length = label, weight, batch_size, max_length
        self.index = label_index(self.model.config, label, model_name)
        self.name = name or f"{Path(str(model_name)).name}:{label}"

    @torch.no_grad()
    def logits(self, texts: Sequence[str]) -> torch.Tensor:
        """All labels' logits, ``(B, n_labels)`` float32 on the CPU; batched, truncated to ``max_length``."""
        dev, out = _model_device(self.model), []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(dev)
            with _autocast(dev):
                out.append(self.model(**enc).logits.float().cpu())  # (b, n_labels)
        return torch.cat(out) if out else torch.zeros(0, self.model.config.num_labels)

    def score(self, texts: Sequence[str]) -> torch.Tensor:
        """The raw logit of ``label``, ``(B,)``."""
        return self.logits(texts)[:, self.index]

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        return self.weight * self.score(responses)


class CombinedReward:
    """``sum_k weight_k * logit_k(response)`` over several classifiers (notebook 01: CoLA + neutral sentiment).

    ``components`` are ``ClassifierReward`` objects (their own ``weight``) or ``(ClassifierReward, weight)``.
    """

    def __init__(self, components):
        self.components, self.weights = {}, {}
        for c in components:
            comp, weight = c if isinstance(c, tuple) else (c, c.weight)
            if comp.name in self.components:
                raise ValueError(f"two reward components are named {comp.name!r}; pass name=... to tell them apart")
            self.components[comp.name], self.weights[comp.name] = comp, float(weight)

    def breakdown(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Each component's raw (unweighted) logit, ``{name: (B,)}``, for plotting components separately."""
        return {name: comp.score(texts) for name, comp in self.components.items()}

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        logits = {name: comp.logits(responses) for name, comp in self.components.items()}
        return combine_logits(logits, {n: c.index for n, c in self.components.items()}, self.weights)


def combine_rewards(components) -> CombinedReward:
    """``CombinedReward(components)``, as a function."""
    return CombinedReward(components)


def summary_reward(cfg: SummaryConfig, *, batch_size: int = 32) -> CombinedReward:
    """Notebook 01's reward: 1.0 x CoLA "acceptable" logit + 0.5 x sentiment "neutral" logit (from ``cfg``).

    The ``cpu`` preset names offline text scorers instead (``"harper"``/``"vader"``, ``sawyer.textreward``):
    the same two components, "cola" (grammar) and "neutral", with the same interface.
    """
    from sawyer.textreward import text_component

    def component(model, label, weight, name):
        return (text_component(model, label, weight, name=name)
                or ClassifierReward(model, label, weight, batch_size, name=name))

    return CombinedReward([component(cfg.cola_model, cfg.cola_label, cfg.cola_weight, "cola"),
                           component(cfg.sentiment_model, cfg.sentiment_label, cfg.sentiment_weight, "neutral")])


# --------------------------------------------------------------------------- cross-encoder reward model (03-05)
def pairwise_loss(r_better: torch.Tensor, r_worse: torch.Tensor, margin=0.0) -> torch.Tensor:
    """Bradley-Terry loss ``mean(-logsigmoid(r_better - r_worse - margin))``; ``(N,)`` inputs, margin scalar/``(N,)``.

    Zero margin: a pair whose rewards tie costs log 2 = 0.693. A margin m moves that point: the loss only
    becomes small once ``r_better`` exceeds ``r_worse`` by clearly more than m.
    """
    return -F.logsigmoid(r_better - r_worse - margin).mean()


def make_margins(pairs, mode: str = "score_diff", scale: float = 1.0) -> torch.Tensor:
    """Per-pair margins ``(N,)``: ``scale * pair.score_diff`` (the original) or zeros (``mode="none"``)."""
    if mode == "score_diff":
        return torch.tensor([scale * float(p.score_diff) for p in pairs], dtype=torch.float32)
    if mode == "none":
        return torch.zeros(len(pairs))
    raise ValueError(f"unknown margin mode {mode!r}; valid: 'score_diff', 'none'")


def encode_pairs(tokenizer, questions: Sequence[str], answers: Sequence[str], max_length: int = 512):
    """Tokenize ``(question, answer)`` pairs, padded on the right, as ``tokenizer(q, a)`` would one by one.

    ``truncation="only_second"`` keeps the whole question and cuts the answer's end. If a question alone
    leaves no room for any answer token, that pair falls back to ``"longest_first"`` (only_second would raise).
    """
    questions, answers = list(questions), list(answers)
    q_len = [len(ids) for ids in  # capped at max_length: enough to tell "fits" from "too long"
             tokenizer(questions, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]]
    room = max_length - tokenizer.num_special_tokens_to_add(pair=True)
    rows: list = [None] * len(questions)
    for strategy, fits in (("only_second", True), ("longest_first", False)):
        idx = [i for i, n in enumerate(q_len) if (n < room) == fits]
        if idx:
            enc = tokenizer([questions[i] for i in idx], [answers[i] for i in idx], truncation=strategy,
                            max_length=max_length)
            for j, i in enumerate(idx):
                rows[i] = {k: enc[k][j] for k in enc.keys()}
    return tokenizer.pad(rows, padding=True, padding_side="right", return_tensors="pt")


def _forward_scores(model, tokenizer, questions, answers, max_length) -> torch.Tensor:
    enc = encode_pairs(tokenizer, questions, answers, max_length).to(_model_device(model))
    with _autocast(enc["input_ids"].device):
        return model(**enc).logits[:, 0].float()  # (b,)


def score_pairs(model, tokenizer, questions: Sequence[str], answers: Sequence[str], *, batch_size: int = 32,
                max_length: int = 512) -> torch.Tensor:
    """The reward model's scalar for each (question, answer), ``(N,)`` float32 on the CPU; no grad, eval mode."""
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    was_training, out = model.training, []
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(questions), batch_size):
                out.append(_forward_scores(model, tokenizer, questions[i:i + batch_size],
                                           answers[i:i + batch_size], max_length).cpu())
    finally:
        model.train(was_training)  # scoring mid-training must not leave dropout off
    return torch.cat(out) if out else torch.zeros(0)


def reward_margins(model, tokenizer, pairs, *, batch_size: int = 32, max_length: int = 512) -> torch.Tensor:
    """``r_better - r_worse`` per pair, ``(N,)``: positive where the model agrees with the label."""
    qs = [p.question for p in pairs]
    scores = score_pairs(model, tokenizer, qs + qs, [p.better for p in pairs] + [p.worse for p in pairs],
                         batch_size=batch_size, max_length=max_length)  # (2N,)
    r_better, r_worse = scores.chunk(2) if len(pairs) else (scores, scores)
    return r_better - r_worse


def pairwise_accuracy(model, tokenizer, pairs, *, batch_size: int = 32, max_length: int = 512) -> float:
    """Fraction of pairs where ``r_better > r_worse`` (0.5 is chance; ties count as wrong)."""
    return float((reward_margins(model, tokenizer, pairs, batch_size=batch_size, max_length=max_length) > 0)
                 .float().mean())


def _batch_order(n: int, batch_size: int, total_steps: int, seed: int):
    """Index batches: a fresh seeded shuffle each epoch, until ``total_steps`` batches are out."""
    g, step = torch.Generator().manual_seed(seed), 0
    while True:
        perm = torch.randperm(n, generator=g).tolist()
        for i in range(0, n, batch_size):
            if step == total_steps:
                return
            yield perm[i:i + batch_size]
            step += 1


def train_reward_model(model, tokenizer, train_pairs, cfg: RewardConfig, *, eval_pairs=None, run_dir=None,
                       progress: bool = True, log_every: int = 10, warmup_ratio: float = 0.1,
                       max_grad_norm: float | None = 1.0, checkpoint_dir=None, checkpoint_every: int | None = None,
                       resume: bool = False) -> list[dict]:
    """Train the cross-encoder on ``(question, better, worse, score_diff)`` pairs with the pairwise loss.

    A plain loop: AdamW, linear warm-up (``warmup_ratio`` of the steps) then linear decay to 0, gradient
    clipping. Each step puts the better *and* worse answers of ``cfg.batch_size`` pairs through one forward
    pass (``2 * batch_size`` sequences). bf16 autocast on GPUs that have it, fp16 autocast + GradScaler on a
    T4, fp32 on the CPU; weights stay fp32 (a fp16/bf16-loaded model is upcast: at lr 1e-6 a bf16 weight
    would not move). Steps: ``cfg.max_steps`` if > 0, else ``cfg.epochs`` passes. Every ``log_every`` steps a
    record ``{"step", "loss/pairwise", "train/accuracy", "train/lr"}`` (means since the last record) is
    appended to the returned list and to ``run_dir/reward_log.jsonl``; with ``eval_pairs`` a last record
    adds ``eval/accuracy``. Deterministic for a given ``cfg.seed`` on the same machine.

    Checkpoints: every ``checkpoint_every`` steps (and after the last) the model, optimiser, schedule, loss
    scaler, random state and running averages go to ``checkpoint_dir`` (``sawyer.checkpoints``, written
    all-or-nothing). With ``resume=True`` a checkpoint there is loaded and training continues from its step:
    the same batches, the same dropout masks, so the result equals an uninterrupted run's.
    """
    from tqdm.auto import tqdm

    if not train_pairs:
        raise ValueError("train_reward_model got no training pairs")
    if any(p.dtype != torch.float32 for p in model.parameters()):
        warnings.warn("reward-model weights are not fp32; upcasting for training (autocast still computes "
                      "in half precision on a GPU)")
        model.float()
    torch.manual_seed(cfg.seed)
    dev = _model_device(model)
    steps_per_epoch = math.ceil(len(train_pairs) / cfg.batch_size)
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warm = int(warmup_ratio * total)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then linear decay (HF's linear schedule)
        opt, lambda s: (s + 1) / (warm + 1) if s < warm else (total - s) / max(1, total - warm))
    # fp16 (a T4): scale the loss so small gradients survive fp16, unscale before clipping (Micikevicius et al. 2018)
    scaler = torch.amp.GradScaler(dev.type, enabled=compute_dtype() == torch.float16)
    margins = make_margins(train_pairs, cfg.margin, cfg.margin_scale)  # (N,)
    log_file, history = (Path(run_dir) / "reward_log.jsonl" if run_dir is not None else None), []
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)

    def log(record: dict) -> None:
        history.append(record)
        if log_file is not None:
            with log_file.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    from sawyer import checkpoints, runs

    model.train()
    losses, accs, start = [], [], 0
    if resume and checkpoint_dir is not None and checkpoints.has_checkpoint(checkpoint_dir):
        extra = checkpoints.load_training_checkpoint(checkpoint_dir, model, opt, scheduler=sched, scaler=scaler)
        start, losses, accs, history[:] = extra["step"], extra["losses"], extra["accs"], extra["history"]
    if log_file is not None and checkpoint_dir is not None:
        runs.read_log(log_file, max_step=start)  # drop what was logged after the checkpoint (all, without one)
    batches = itertools.islice(_batch_order(len(train_pairs), cfg.batch_size, total, cfg.seed), start, None)
    bar = tqdm(batches, total=total, initial=start, desc="reward model", disable=not progress)
    for step, idx in enumerate(bar, start=start + 1):
        batch = [train_pairs[i] for i in idx]
        qs = [p.question for p in batch]  # each question twice: once with the better, once with the worse answer
        rewards = _forward_scores(model, tokenizer, qs + qs, [p.better for p in batch] + [p.worse for p in batch],
                                  cfg.max_length)  # (2b,): better answers first, then worse
        r_better, r_worse = rewards.chunk(2)  # (b,), (b,)
        loss = pairwise_loss(r_better, r_worse, margins[idx].to(dev))
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"reward-model loss is {loss.item()} at step {step}; lower the learning rate")
        scaler.scale(loss).backward()
        if max_grad_norm is not None:
            scaler.unscale_(opt)  # clip the true gradients, not the loss-scaled ones
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        lr = sched.get_last_lr()[0]  # the rate this step used
        sched.step()
        losses.append(loss.item())
        accs.append((r_better > r_worse).float().mean().item())
        if step % log_every == 0 or step == total:
            log({"step": step, "loss/pairwise": sum(losses) / len(losses), "train/accuracy": sum(accs) / len(accs),
                 "train/lr": lr})
            bar.set_postfix(loss=f"{history[-1]['loss/pairwise']:.3f}", acc=f"{history[-1]['train/accuracy']:.2f}")
            losses, accs = [], []
        if checkpoint_dir is not None and checkpoint_every and (step % checkpoint_every == 0 or step == total):
            checkpoints.save_training_checkpoint(checkpoint_dir, model, opt, scheduler=sched, scaler=scaler, extra={
                "step": step, "losses": losses, "accs": accs, "history": history})
    model.eval()
    if eval_pairs:
        log({"step": total,
             "eval/accuracy": pairwise_accuracy(model, tokenizer, eval_pairs, max_length=cfg.max_length)})
    return history


class CrossEncoderReward:
    """The trained reward model as a ``reward_fn(prompts, responses)``: its raw logit on (question, response).

    Scoring is on *text* with the reward model's own tokenizer (the policy's tokenizer is a different one).
    PPO prompts are chat-formatted (``###HUMAN### ... ###BOT###``) while the RM was trained on plain
    questions: ``question_from_prompt`` maps a prompt back to that question (default: unchanged; notebook 04
    passes a ``sawyer.chat``-aware extractor).
    """

    def __init__(self, model, tokenizer, batch_size: int = 16, max_length: int = 512,
                 question_from_prompt: Callable[[str], str] | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.question_from_prompt = question_from_prompt or (lambda prompt: prompt)

    @classmethod
    def from_pretrained(cls, folder, **kwargs) -> CrossEncoderReward:
        """Load a folder written by ``save_reward_model``."""
        return cls(*load_reward_model(folder), **kwargs)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        questions = [self.question_from_prompt(p) for p in prompts]
        return score_pairs(self.model, self.tokenizer, questions, list(responses), batch_size=self.batch_size,
                           max_length=self.max_length)  # (B,)


def save_reward_model(model, tokenizer, folder) -> Path:
    """Write model (safetensors) and tokenizer to ``folder``; ``load_reward_model`` reads it back."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)  # transformers writes model.safetensors
    tokenizer.save_pretrained(folder)
    return folder


def load_reward_model(folder, *, dtype: torch.dtype | None = None):
    """``(model, tokenizer)`` from a saved reward-model folder, in eval mode on ``sawyer.loading.device()``."""
    return load_classifier(str(folder), dtype=dtype).eval(), load_tokenizer(str(folder))


def length_bias(rewards, lengths) -> dict:
    """How strongly reward tracks answer length (characters or tokens): Pearson, Spearman, OLS slope.

    ``pearson_r`` measures a linear trend, ``spearman_rho`` any monotone one (robust to a few huge outliers);
    each comes with its p-value. ``slope`` is reward per unit of length. A clearly positive correlation means
    the reward model pays for length, which PPO will exploit with longer, rambling answers. Caveat: longer
    answers can also be genuinely better, so confirm with pairs that differ only in padding or repetition.
    """
    from scipy import stats

    r = torch.as_tensor(rewards, dtype=torch.float64).detach().cpu().flatten().numpy()
    n = torch.as_tensor(lengths, dtype=torch.float64).detach().cpu().flatten().numpy()
    if len(r) != len(n) or len(r) < 3:
        raise ValueError(f"length_bias needs >= 3 matching values, got {len(r)} rewards and {len(n)} lengths")
    pearson, spearman, fit = stats.pearsonr(n, r), stats.spearmanr(n, r), stats.linregress(n, r)
    return {"pearson_r": float(pearson[0]), "pearson_p": float(pearson[1]),
            "spearman_rho": float(spearman[0]), "spearman_p": float(spearman[1]),
            "slope": float(fit.slope), "intercept": float(fit.intercept), "n": int(len(r))}
