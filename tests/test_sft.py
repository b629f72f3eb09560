"""SFT (sawyer.sft): the completion-only label mask, filtering, the collator, and a short real run.

The training tests share one run (module fixture) of the tiny Llama on the real ``data/`` conversations
with the ``tiny`` preset at a higher learning rate for 60 steps (see ``TRAIN``): about 6 s of one CPU core.
"""
import dataclasses
import json
import math
from types import SimpleNamespace

import pytest
import torch

from sawyer import sft, tokens
from sawyer.chat import BOT, HUMAN, STOP
from sawyer.data import load_conversations, split
from sawyer.loading import is_4bit, load_causal_lm, load_tokenizer
from sawyer.presets import get_preset

#: Overrides of ``get_preset("tiny").sft``: 60 steps (about 2 epochs) at lr 1e-2 teach the tiny Llama to stop.
TRAIN = {"max_steps": 60, "learning_rate": 1e-2}
N_PROMPTS = 8  # training prompts answered greedily before and after training


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these matrices are too small to gain from two, and on a busy machine two
    threads waiting on each other made a training step ~50x slower (measured: 0.2 s vs 12.8 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def marked():
    """The tiny tokenizer with the three markers added (through ``sawyer.tokens``), and their ids."""
    tok = load_tokenizer("tiny:llama")
    ids = tokens.add_special_tokens(load_causal_lm("tiny:llama"), tok)
    return tok, ids


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def stop_is_top(model, tok, examples) -> float:
    """Fraction of examples where ###STOP### is the model's top next token right after the full reply."""
    model.eval()
    batch = sft.CompletionOnlyCollator(tok.pad_token_id)(examples)
    batch.pop("labels")
    logits = model(**batch).logits                                  # (B, T, V)
    before_stop = batch["attention_mask"].sum(1) - 2                 # (B,) position of the reply's last token
    top = logits[torch.arange(len(examples)), before_stop].argmax(-1)  # (B,)
    return (top == tok.convert_tokens_to_ids(STOP)).float().mean().item()


# --------------------------------------------------------------------------- the label mask (literal)
def test_label_mask_literal(marked):
    tok, ids = marked
    turns = [("human", "What is umami?"), ("bot", "A taste."), ("human", "And sour?"), ("bot", "Another taste.")]
    (ex,), stats = sft.build_examples([turns], tok, max_seq_len=1000)
    assert stats == {"kept": 1, "too_long": 0}

    # built piece by piece: BOS, each marker a single id, the text between markers tokenised on its own
    prompt = [tok.bos_token_id, ids[HUMAN], *enc(tok, " What is umami? "), ids[BOT], *enc(tok, " A taste. "),
              ids[HUMAN], *enc(tok, " And sour? "), ids[BOT]]
    completion = [*enc(tok, " Another taste. "), ids[STOP]]
    assert ex["input_ids"] == prompt + completion
    # loss only on the final reply and ###STOP###: the human turns, the earlier reply and ###BOT### are masked
    assert ex["labels"] == [-100] * len(prompt) + completion
    assert [i for i, label in enumerate(ex["labels"]) if label != -100] == list(range(len(prompt), len(ex["labels"])))
    unmasked = [t for t, label in zip(ex["input_ids"], ex["labels"]) if label != -100]
    assert tok.decode(unmasked).split() == ["Another", "taste.", STOP]


def test_filtering_counts_and_keeps_order(marked):
    tok, _ = marked
    convs = [[("human", "hi"), ("bot", "ok " * n)] for n in (1, 40, 5, 80)]
    lengths = [len(sft.build_examples([c], tok, 10**6)[0][0]["input_ids"]) for c in convs]
    limit = lengths[2]  # the boundary: exactly max_seq_len tokens is kept
    examples, stats = sft.build_examples(convs, tok, max_seq_len=limit)
    assert stats == {"kept": 2, "too_long": 2}
    assert [len(e["input_ids"]) for e in examples] == [lengths[0], lengths[2]]
    assert all(e["input_ids"][-1] == tok.convert_tokens_to_ids(STOP) for e in examples)  # never truncated


def test_build_examples_needs_the_markers():
    with pytest.raises(ValueError, match="add the markers"):
        sft.build_examples([[("human", "hi"), ("bot", "sup")]], load_tokenizer("tiny:llama"), 100)


# --------------------------------------------------------------------------- the collator (literal)
def test_collator_right_pads_literal():
    batch = sft.CompletionOnlyCollator(pad_token_id=0)([
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8], "labels": [8]},
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(v.dtype == torch.long for v in batch.values())


def test_collator_pad_to_multiple_of():
    batch = sft.CompletionOnlyCollator(pad_token_id=1, pad_to_multiple_of=4)([{"input_ids": [5, 6, 7, 8, 9],
                                                                               "labels": [5, 6, 7, 8, 9]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1, 1, 1]]
    assert batch["labels"].tolist() == [[5, 6, 7, 8, 9, -100, -100, -100]]


# --------------------------------------------------------------------------- a real (short) run
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg = dataclasses.replace(get_preset("tiny").sft, **TRAIN)
    torch.manual_seed(0)
    model, tok, ids = sft.prepare_sawyer_model(cfg, verbose=False)
    conversations, _ = load_conversations(cfg.datasets, max_rows=cfg.max_rows)
    train, held_out = split(conversations, cfg.eval_fraction, cfg.seed)
    train_ex, train_stats = sft.build_examples(train, tok, cfg.max_seq_len)
    eval_ex, _ = sft.build_examples(held_out, tok, cfg.max_seq_len)
    questions = [turns[:-1] for turns in train[:N_PROMPTS]]
    stopped_before = sum(g.stopped for g in sft.generate(model, tok, questions, max_new_tokens=64))
    stop_top_before = stop_is_top(model, tok, eval_ex)
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = tmp_path_factory.mktemp("sft")
    result = sft.train_sft(model, tok, train_ex, eval_ex, cfg, output_dir=out, progress=False)
    return SimpleNamespace(cfg=cfg, model=model, tok=tok, ids=ids, result=result, out=out, questions=questions,
                           stopped_before=stopped_before, stop_top_before=stop_top_before,
                           params_before=params_before, train_stats=train_stats, eval_ex=eval_ex)


def test_run_uses_the_data_and_logs(run):
    assert run.train_stats["kept"] > 150 and run.result["steps"] == TRAIN["max_steps"]
    lines = [json.loads(x) for x in (run.out / "sft_log.jsonl").read_text().splitlines()]
    assert any("loss" in x for x in lines) and sum("eval_loss" in x for x in lines) == 2
    assert run.result["log_history"][-1]["eval_loss"] == run.result["eval_loss_after"]
    assert not list(run.out.glob("checkpoint-*"))  # no checkpoints unless asked


def test_eval_loss_falls(run):
    before, after = run.result["eval_loss_before"], run.result["eval_loss_after"]
    assert after < before - 0.1, (before, after)


def test_lora_and_marker_rows_moved_base_did_not(run):
    moved = {n for n, p in run.model.named_parameters() if not torch.equal(p, run.params_before[n])}
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert moved == trainable  # every LoRA matrix and marker row trained; every frozen base weight bit-for-bit equal
    assert {k for n in moved for k in ("lora_A", "lora_B", "trainable_tokens_delta") if k in n} == {
        "lora_A", "lora_B", "trainable_tokens_delta"}
    assert sum("trainable_tokens_delta" in n for n in moved) == 2  # input and (untied) output marker rows


def test_learns_to_stop(run):
    # teacher-forced on held-out conversations: after the full reply, ###STOP### becomes the top token
    assert run.stop_top_before < 0.1 and stop_is_top(run.model, run.tok, run.eval_ex) > 0.9
    # free-running greedy answers to training prompts: most now end with ###STOP### (none did before);
    # the tiny model rambles off-distribution, so a few may still run to max_new_tokens
    gens = sft.generate(run.model, run.tok, run.questions, max_new_tokens=64)
    stopped = sum(g.stopped for g in gens)
    assert run.stopped_before == 0 and stopped >= N_PROMPTS // 2, [g.num_tokens for g in gens if g.stopped]
    assert all(STOP not in g.reply and g.reply for g in gens)
    assert all(g.stopped_at in (STOP, run.tok.eos_token, None) for g in gens)
    assert sft.generate_answers(run.model, run.tok, run.questions[:2], max_new_tokens=64) == [g.reply for g in gens[:2]]


def test_save_and_reload_gives_the_same_logits(run, tmp_path):
    size = tokens.save_adapter(run.model, run.tok, tmp_path)
    assert size < 2_000_000  # LoRA and three marker rows, not the model
    reloaded, tok = tokens.load_adapter(run.cfg.base_model, tmp_path)
    assert tok.convert_tokens_to_ids(STOP) == run.ids[STOP]
    batch = sft.CompletionOnlyCollator(tok.pad_token_id)(run.eval_ex[:4])
    batch.pop("labels")
    run.model.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, run.model(**batch).logits, rtol=0, atol=1e-5)


def test_adapter_checkpoints_and_resume(tmp_path):
    cfg = dataclasses.replace(get_preset("tiny").sft, max_steps=2, batch_size=2, eval_batches=1)
    model, tok, _ = sft.prepare_sawyer_model(cfg, verbose=False)
    conversations, _ = load_conversations(cfg.datasets, max_rows=8)
    examples, _ = sft.build_examples(conversations, tok, cfg.max_seq_len)
    sft.train_sft(model, tok, examples, examples, cfg, output_dir=tmp_path, progress=False, save_steps=1)
    ckpt = tmp_path / "checkpoint-1"
    assert (ckpt / "adapter_model.safetensors").exists() and not (ckpt / "model.safetensors").exists()
    assert (ckpt / tokens.TOKENS_FILE).exists() and (ckpt / "optimizer.pt").exists()

    model2, tok2, _ = sft.prepare_sawyer_model(cfg, verbose=False)
    result = sft.train_sft(model2, tok2, examples, examples, cfg, output_dir=tmp_path / "resumed", progress=False,
                           resume_from_checkpoint=str(ckpt))
    assert result["steps"] == 2
    lines = [json.loads(x) for x in (tmp_path / "resumed" / "sft_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [2]  # only the second step ran after resuming


def test_4bit_branch_trains_with_full_gradients(tmp_path):
    """QLoRA on bitsandbytes' CPU backend, after an eval-mode generate() (which repacks 4-bit layers for
    inference on CPUs with AVX512-BF16): train_sft must still backpropagate through the 4-bit base layers."""
    cfg = dataclasses.replace(get_preset("tiny").sft, load_in_4bit=True, gradient_checkpointing=True, lora_dropout=0.0,
                              batch_size=2, eval_batches=1, warmup_ratio=0.0, max_steps=1, learning_rate=1e-12)
    model, tok, _ = sft.prepare_sawyer_model(cfg, verbose=False)
    assert is_4bit(model)
    examples, _ = sft.build_examples(load_conversations(cfg.datasets, max_rows=4)[0], tok, cfg.max_seq_len)
    batch = sft.CompletionOnlyCollator(tok.pad_token_id)(examples[:2])
    first_b = next(p for n, p in model.named_parameters() if "layers.0.self_attn.q_proj.lora_B" in n)

    def first_layer_grad():  # reaches layer 0 only through the 4-bit layers above it
        model.train()
        model.zero_grad()
        model(**batch).loss.backward()
        return first_b.grad.clone()

    fresh = first_layer_grad()
    assert fresh.abs().max() > 0
    sft.generate(model, tok, ["hi"], max_new_tokens=2)
    sft.train_sft(model, tok, examples, examples, cfg, output_dir=tmp_path / "lr0", progress=False)  # lr 1e-12: no visible change
    # the packing round trip stores scales in bf16, hence a small difference; the bug loses all of it (~100%)
    assert ((first_layer_grad() - fresh).norm() / fresh.norm()).item() < 0.05

    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    cfg = dataclasses.replace(cfg, max_steps=3, learning_rate=1e-2)
    result = sft.train_sft(model, tok, examples, examples, cfg, output_dir=tmp_path / "run", progress=False)
    assert result["steps"] == 3 and all(map(math.isfinite, (result["train_loss"], result["eval_loss_after"])))
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_generate_with_a_base_model_without_markers():
    """The notebook's "base model vs SAWYER" column: no ###STOP### token, so only EOS (or the budget) ends it."""
    model, tok = load_causal_lm("tiny:llama"), load_tokenizer("tiny:llama")
    gens = sft.generate(model, tok, ["What is umami?", [("human", "hi"), ("bot", "sup"), ("human", "and you?")]],
                        max_new_tokens=12)
    assert len(gens) == 2 and not any(g.stopped for g in gens)
    assert all(g.stopped_at in (tok.eos_token, None) and 0 < g.num_tokens <= 12 for g in gens)
    assert tok.padding_side == load_tokenizer("tiny:llama").padding_side  # restored after left padding
