"""DPO and GRPO from the SFT adapter, next to PPO, on the same data and the same reward (notebook 06).

Three ways to turn "people prefer answer A to answer B" into a better policy:

- **PPO** (notebook 04, ``sawyer.ppo``): learn a reward model from the pairs (notebook 03), then sample answers
  from the policy, score them, and climb the score with a KL penalty towards the SFT model.
- **DPO** (Rafailov et al. 2023): skip the reward model and the sampling. The KL-regularised objective has a
  closed-form optimum, so the reward can be written with the policy's own log-probabilities and the
  Bradley-Terry loss applied to the *dataset's* pairs directly (``dpo_loss``; derivation in notebook 06).
- **GRPO** (Shao et al. 2024, DeepSeekMath): like PPO, sample and score with the reward model, but no value
  head: each prompt gets a *group* of answers and an answer's advantage is its score minus the group mean
  (divided by the group's std). Cheaper than PPO (no critic), needs several samples per prompt.

What is ours and what is TRL's: both trainers are TRL's (``DPOTrainer``, ``GRPOTrainer``, trl 1.16.0). This
module supplies what the comparison needs to be fair: DPO pairs from notebook 03's **train split only**, in
SAWYER's chat template and tokenised exactly like SFT's examples; GRPO prompts from notebook 04's **train
split**; a reward adapter that hands GRPO the **same** reward object PPO used; the same trainable set as PPO
(LoRA of the policy adapter; the marker rows stay at their SFT values); a frozen SFT reference as a second
adapter on the same base weights (TRL copies the loaded adapter to one named ``"ref"``, ``sync_reference``
completes the copy with the marker rows); and cost accounting.

**One shim, and why.** TRL 1.16 computes log-probs with a fused LM head that reads ``lm_head.weight`` and
``lm_head.bias``. Our adapters train the marker rows of an untied ``lm_head`` through PEFT's
``TrainableTokensWrapper``, which exposes ``weight`` (merged with the adapter's rows) but no ``bias``
(``AttributeError``, the failure that made ``sawyer.sft`` use ``transformers.Trainer``). ``allow_fused_lm_head``
gives the wrapper the ``bias`` of the layer it wraps (``None`` for Llama and Qwen heads). Tests check that the
fused head's log-probs then equal a plain forward pass with a full log-softmax, marker rows included.
"""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from sawyer import chat

RewardFn = Callable[[Sequence[str], Sequence[str]], torch.Tensor]


# --------------------------------------------------------------------------- 1. data: pairs and prompts
def check_no_leak(train_pairs, held_out_pairs) -> None:
    """Refuse training pairs whose question (or item) is also held out: the reward model was evaluated on
    the held-out pairs, and DPO must learn from exactly what the reward model learned from."""
    held_items = {p.item for p in held_out_pairs}
    held_questions = {p.question for p in held_out_pairs}
    for i, p in enumerate(train_pairs):
        if p.item in held_items or p.question in held_questions:
            raise ValueError(f"training pair {i} (item {p.item}, question {p.question[:60]!r}) is also in the "
                             "held-out split: build the splits with data.split_by_group(pairs, 'item', ...)")


def dpo_examples(train_pairs, tokenizer, max_seq_len: int, *, held_out_pairs=()) -> tuple[list[dict], dict]:
    """Notebook 03's training pairs as DPO examples ``{"prompt_ids", "chosen_ids", "rejected_ids"}``.

    The prompt is the question as a SAWYER human turn ending in ``###BOT###``; each answer is the completion
    `` {answer} ###STOP###``. Both are tokenised by ``sawyer.sft.tokenize_example``, so DPO sees exactly the
    token layout SFT trained (prompt with BOS, completion without special tokens, no EOS appended). Pairs with
    an empty answer, or whose longer side exceeds ``max_seq_len``, are dropped (not truncated: that would cut
    the ``###STOP###`` the model must keep emitting) and counted. ``held_out_pairs`` are checked for leakage.
    Returns ``(examples, {"kept", "empty", "too_long"})``.
    """
    from sawyer.sft import IGNORE_INDEX, tokenize_example

    check_no_leak(train_pairs, held_out_pairs)
    examples, stats = [], {"kept": 0, "empty": 0, "too_long": 0}
    for pair in train_pairs:
        if not pair.better.strip() or not pair.worse.strip() or not pair.question.strip():
            stats["empty"] += 1
            continue
        sides = []
        for answer in (pair.better, pair.worse):
            prompt, completion = chat.split_for_training([("human", pair.question), ("bot", answer)])
            ex = tokenize_example(prompt, completion, tokenizer)
            n_prompt = sum(label == IGNORE_INDEX for label in ex["labels"])
            sides.append((ex["input_ids"][:n_prompt], ex["input_ids"][n_prompt:]))
        if max(len(p) + len(c) for p, c in sides) > max_seq_len:
            stats["too_long"] += 1
            continue
        assert sides[0][0] == sides[1][0], "one question, one prompt"
        examples.append({"prompt_ids": sides[0][0], "chosen_ids": sides[0][1], "rejected_ids": sides[1][1]})
        stats["kept"] += 1
    if not examples:
        raise ValueError(f"no DPO pairs left out of {len(train_pairs)} ({stats}); raise max_seq_len")
    return examples, stats


def ppo_prompt_split(cfg, tokenizer) -> tuple[list[str], list[str]]:
    """``(train_prompts, test_prompts)`` exactly as notebook 04 builds them from a ``SawyerPPOConfig``:
    dolly prompts as human turns, those of ``max_prompt_tokens`` or more dropped, the same seeded split.
    Notebook 06 checks the test half against ``04_ppo/test_prompts.json``."""
    from sawyer import data

    raw = data.load_dolly_prompts(cfg.dataset, n=cfg.n_prompts, seed=cfg.seed)
    kept = [p for p in map(chat.format_prompt, raw) if len(tokenizer(p)["input_ids"]) < cfg.max_prompt_tokens]
    return data.split(kept, cfg.n_test / len(kept), cfg.seed)


# --------------------------------------------------------------------------- 2. the model: trainable set, shim
def allow_fused_lm_head(model) -> None:
    """Give PEFT's wrapper around the output layer the ``bias`` of the layer it wraps (see the module doc).

    Only the missing attribute is added; the weight TRL reads stays PEFT's merged weight (base rows plus
    this adapter's marker rows), so the numbers are the model's own. Raises if the wrapped layer has a bias
    (none of our models has one; supporting it would need more than an attribute).
    """
    from sawyer.tokens import _unwrap

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if head is None or hasattr(head, "bias"):
        return
    inner = _unwrap(head)
    if getattr(inner, "bias", None) is not None:
        raise ValueError(f"the output layer {type(inner).__name__} has a bias; TRL's fused LM head cannot see it "
                         "through PEFT's TrainableTokensWrapper")
    head.bias = None


def sync_reference(model, adapter: str = "default", reference: str = "ref") -> int:
    """Make the ``reference`` adapter an exact copy of ``adapter``; returns how many tensors were copied.

    TRL builds its ``"ref"`` adapter by copying parameters whose names contain ``".default."``. The marker
    rows live in ``...trainable_tokens_delta.default`` (no dot after the adapter name), so TRL's copy skips
    them and the reference would read the markers with their phrase-mean start instead of SFT's trained rows
    (checked with trl 1.16.0 / peft 0.21.2: DPO's first loss was 0.670, not log 2). We copy everything.
    """
    params = dict(model.named_parameters())
    own = re.compile(rf"\.{re.escape(adapter)}(?=\.|$)")
    copied = 0
    with torch.no_grad():
        for name, p in params.items():
            if own.search(name):
                params[own.sub(f".{reference}", name)].copy_(p)
                copied += 1
    if not copied:
        raise ValueError(f"adapter {adapter!r} has no parameters to copy into {reference!r}")
    return copied


def train_only_lora(model, adapter: str = "default") -> list[str]:
    """Freeze everything except ``adapter``'s LoRA matrices (as ``sawyer.ppo.setup`` does for PPO), so the three
    methods train the same parameters; the marker rows keep their SFT values. Returns the trainable names.

    Call it before building a TRL trainer too: on a 4-bit base, TRL casts every trainable parameter to bf16
    (QLoRA's recipe), which would round the frozen-to-be marker rows (seen with trl 1.16.0: the saved rows
    no longer equalled SFT's). The LoRA matrices are put back in fp32 here (a T4 has no bf16)."""
    own_lora = re.compile(rf"\.lora_\w+\.{re.escape(adapter)}(\.|$)")
    names = []
    for name, p in model.named_parameters():
        trainable = bool(own_lora.search(name))
        p.requires_grad_(trainable)
        if trainable:
            if p.dtype != torch.float32:  # fp32 master weights (TRL casts QLoRA adapters to bf16; a T4 has none)
                p.data = p.data.float()
            names.append(name)
    if not names:
        raise ValueError(f"adapter {adapter!r} has no LoRA parameters to train")
    return names


# --------------------------------------------------------------------------- 3. the shared reward
class GRPOReward:
    """PPO's ``reward_fn(prompts, responses) -> Tensor[B]`` as a TRL reward function.

    ``reward_fn`` is kept as is (``self.reward_fn is`` the object PPO used); TRL passes ``prompts`` and
    ``completions`` (decoded without special tokens, cut at the first stop token) and wants a list of floats.
    Completions are stripped as ``sawyer.ppo.rollout`` strips its responses, so an answer gets the score PPO
    would give it. A non-finite score is an error naming the sample. ``samples`` counts the answers scored.
    """

    __name__ = "reward_model"  # the name TRL logs the reward under (rewards/reward_model/mean)

    def __init__(self, reward_fn: RewardFn):
        self.reward_fn = reward_fn
        self.samples = 0

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        responses = [c.strip() for c in completions]
        scores = torch.as_tensor(self.reward_fn(list(prompts), responses), dtype=torch.float32).flatten()
        if scores.shape != (len(responses),):
            raise ValueError(f"reward_fn returned {tuple(scores.shape)} scores for {len(responses)} completions")
        bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"reward_fn returned a non-finite score for completion {bad[0]} "
                             f"(prompt {prompts[bad[0]][-60:]!r}, completion {responses[bad[0]][:60]!r})")
        self.samples += len(responses)
        return scores.tolist()


# --------------------------------------------------------------------------- 4. the DPO loss (for teaching)
def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float):
    """``-log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))])`` per pair, (B,).

    Sequence log-probs are sums over completion tokens. TRL's ``loss_type="sigmoid"`` computes the same;
    this copy is the equation of notebook 06 in code (tests check it against TRL's trainer).
    """
    margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)  # (B,)
    return -torch.nn.functional.logsigmoid(beta * margin)


# --------------------------------------------------------------------------- 5. cost accounting
class Cost:
    """Wall time and peak memory of a block: ``with Cost() as c: ...``; then ``c.as_dict()``.

    GPU: the peak of ``torch.cuda.max_memory_allocated`` during the block (its counter is reset on entry).
    CPU: the peak resident memory of this process, sampled every 20 ms by a thread (the whole process: the
    base model and the reward model count too, so compare CPU numbers with each other, not with a GPU's).
    """

    def __init__(self):
        self.wall_s = 0.0
        self.peak_bytes = 0
        self.kind = "cuda_max_allocated" if torch.cuda.is_available() else "cpu_peak_rss"
        self._stop = threading.Event()

    def _sample(self):
        import psutil

        proc = psutil.Process()
        while not self._stop.wait(0.02):
            self.peak_bytes = max(self.peak_bytes, proc.memory_info().rss)

    def __enter__(self) -> Cost:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        else:
            import psutil

            self.peak_bytes = psutil.Process().memory_info().rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall_s = time.perf_counter() - self._t0
        if torch.cuda.is_available():
            self.peak_bytes = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
        return False

    def as_dict(self) -> dict:
        return {"wall_s": round(self.wall_s, 2), "peak_memory_gib": round(self.peak_bytes / 2**30, 3),
                "memory_kind": self.kind}


# --------------------------------------------------------------------------- 6. training through TRL
def _precision() -> dict:
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    return {"bf16": bf16, "fp16": cuda and not bf16, "use_cpu": not cuda, "dataloader_pin_memory": cuda}


def _common_args(cfg, output_dir, progress: bool) -> dict:
    return dict(output_dir=str(output_dir), seed=cfg.seed, report_to=[], disable_tqdm=not progress,
                learning_rate=cfg.learning_rate, lr_scheduler_type="constant", max_steps=cfg.steps,
                gradient_accumulation_steps=cfg.gradient_accumulation_steps, logging_steps=1,
                save_strategy="no", activation_checkpointing=cfg.gradient_checkpointing,
                activation_checkpointing_kwargs={"use_reentrant": False}, **_precision())


def _run(trainer, policy, progress: bool) -> dict:
    from transformers import PrinterCallback

    from sawyer.sft import _keep_4bit_trainable_on_cpu

    _keep_4bit_trainable_on_cpu(policy)
    sync_reference(policy)               # the frozen "ref" adapter = the SFT adapter, marker rows included
    trainable = train_only_lora(policy)  # again after TRL's init: "ref" frozen, LoRA back in fp32
    if not progress:
        trainer.remove_callback(PrinterCallback)
    with Cost() as cost:
        result = trainer.train()
    policy.eval()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    return {"steps": result.global_step, "train_loss": result.training_loss, "log": logs,
            "trainable_parameters": sum(p.numel() for n, p in policy.named_parameters() if n in set(trainable)),
            "cost": cost.as_dict()}


def train_dpo(policy, tokenizer, examples: list[dict], cfg, output_dir, *, progress: bool = True) -> dict:
    """DPO with TRL's ``DPOTrainer`` from a policy loaded from the SFT adapter (``is_trainable=True``).

    TRL copies the loaded adapter into a frozen ``"ref"`` adapter: the reference is the SFT model on the same
    base weights. ``examples`` come from ``dpo_examples`` (already tokenised, so TRL's own tokenisation,
    which would append EOS after ``###STOP###``, is skipped). Returns steps, the loss log (with TRL's
    ``rewards/margins`` and ``rewards/accuracies``), and the cost (wall time, peak memory, sequences).
    """
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    class TokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):  # our examples are already tokenised
            return dataset

    allow_fused_lm_head(policy)
    train_only_lora(policy)  # before TRL's init, which casts whatever is trainable to bf16 on a 4-bit base
    args = DPOConfig(beta=cfg.beta, per_device_train_batch_size=cfg.batch_size, max_length=None,
                     disable_dropout=True, remove_unused_columns=False, **_common_args(cfg, output_dir, progress))
    trainer = TokenizedDPOTrainer(model=policy, args=args, train_dataset=Dataset.from_list(examples),
                                  processing_class=tokenizer)
    out = _run(trainer, policy, progress)
    pairs_seen = out["steps"] * cfg.batch_size * cfg.gradient_accumulation_steps
    out["cost"].update(samples_generated=0, reward_model_calls=0, pairs_trained=pairs_seen,
                       sequences_forward=4 * pairs_seen)  # chosen + rejected, policy + reference
    policy.delete_adapter("ref")
    return out


def train_grpo(policy, tokenizer, prompts: list[str], reward: GRPOReward, cfg, output_dir, *,
               progress: bool = True) -> dict:
    """GRPO with TRL's ``GRPOTrainer``: ``cfg.prompts_per_step`` prompts x ``cfg.group_size`` sampled answers
    per step, scored by ``reward`` (a ``GRPOReward`` around PPO's reward object), advantages relative to each
    prompt's group, and a KL term (``cfg.beta``) towards the frozen ``"ref"`` copy of the SFT adapter.

    Generation stops at ``###STOP###`` (added to the model's EOS ids, as PPO's stop ids), samples with plain
    temperature (no top-k/top-p), and TRL masks every token after the stop.
    """
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    if cfg.beta <= 0:
        raise ValueError("GRPO beta must be > 0 here: the comparison keeps a KL term to the SFT model, as PPO does")
    allow_fused_lm_head(policy)
    train_only_lora(policy)  # before TRL's init, which casts whatever is trainable to bf16 on a 4-bit base
    policy.generation_config.eos_token_id = chat.stop_token_ids(tokenizer)
    args = GRPOConfig(beta=cfg.beta, num_generations=cfg.group_size,
                      per_device_train_batch_size=cfg.prompts_per_step * cfg.group_size,
                      max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, top_p=1.0, top_k=0,
                      loss_type=cfg.loss_type, scale_rewards=cfg.scale_rewards, num_iterations=cfg.iterations,
                      disable_dropout=True, **_common_args(cfg, output_dir, progress))
    trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]))
    before = reward.samples
    out = _run(trainer, policy, progress)
    samples = reward.samples - before
    out["cost"].update(samples_generated=samples, reward_model_calls=samples)
    policy.delete_adapter("ref")
    return out


@dataclass
class RoundTrip:
    """What ``check_round_trip`` found: logits of the trained and the reloaded model, and the marker rows."""

    max_abs_logit_diff: float
    marker_rows_equal_sft: bool

    @property
    def ok(self) -> bool:
        return self.max_abs_logit_diff < 1e-4 and self.marker_rows_equal_sft


def marker_rows(model, tokenizer) -> torch.Tensor:
    """The marker rows of the input and output embeddings as one (2 * n_markers, H) tensor, adapter applied."""
    from sawyer.tokens import is_tied

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    ids = torch.tensor([tokenizer.convert_tokens_to_ids(m) for m in (chat.HUMAN, chat.BOT, chat.STOP)])
    rows = [base.get_input_embeddings()(ids.to(base.device))]
    if not is_tied(base):
        rows.append(base.get_output_embeddings().weight[ids.to(base.device)])
    return torch.cat(rows).detach().float().cpu()


@torch.no_grad()
def check_round_trip(trained, tokenizer, folder, base_model: str, sft_rows: torch.Tensor, *,
                     load_in_4bit: bool = False, prompt: str = "###HUMAN### Hello! ###BOT###") -> RoundTrip:
    """Reload ``folder`` (``sawyer.tokens.load_adapter``) and compare with the trained model: the logits on one
    prompt, and the marker rows against the SFT adapter's (``sft_rows``), which training left untouched."""
    from sawyer.tokens import load_adapter

    reloaded, tok = load_adapter(base_model, folder, load_in_4bit=load_in_4bit)
    enc = tokenizer(prompt, return_tensors="pt")
    a = trained.eval()(**enc.to(trained.device)).logits.float().cpu()
    b = reloaded.eval()(**tok(prompt, return_tensors="pt").to(reloaded.device)).logits.float().cpu()
    same_rows = torch.equal(marker_rows(reloaded, tok), sft_rows)
    del reloaded
    return RoundTrip(float((a - b).abs().max()), same_rows)


def save_log(log: list[dict], path) -> Path:
    """One JSON line per logged training step (``plots.training_curves`` reads the same records)."""
    import json

    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in log))
    return path


def markdown_table(frame) -> str:
    """A pandas DataFrame as a GitHub markdown table (index as the first column), without ``tabulate``."""
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    head = ["", *map(str, frame.columns)]
    rows = [[str(i), *map(cell, r)] for i, r in zip(frame.index, frame.itertuples(index=False))]
    return "\n".join("| " + " | ".join(r) + " |" for r in [head, ["---"] * len(head), *rows]) + "\n"
