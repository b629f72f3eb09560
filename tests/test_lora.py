"""Tests of sawyer.lora: per-architecture targets (checked on the LoRA layers actually created), the head never
a LoRA target, literal parameter counts, and that one optimiser step moves LoRA weights and nothing else."""
import pytest
import torch
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from transformers import GPT2Config, GPT2LMHeadModel

from sawyer import lora
from sawyer.loading import is_4bit, load_causal_lm, load_classifier, load_seq2seq_lm, prepare_for_training

LLAMA_ALL = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _lora_leaves(peft_model) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def _lora_names(peft_model) -> list[str]:
    return [n for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]


def _load(kind: str):
    if kind == "llama":
        return load_causal_lm("tiny:llama")
    if kind == "t5":
        return load_seq2seq_lm("tiny:t5")
    if kind == "roberta":
        return load_classifier("tiny:cola")
    return load_classifier("tiny:minilm", num_labels=1)  # BERT (the real MiniLM) as a cross-encoder


@pytest.mark.parametrize("kind, task, expected", [
    ("llama", "CAUSAL_LM", {"q_proj", "v_proj"}),
    ("t5", "SEQ_2_SEQ_LM", {"q", "v"}),
    ("roberta", "SEQ_CLS", {"query", "value"}),
    ("bert", "SEQ_CLS", {"query", "value"}),
])
def test_qv_targets_resolve_per_architecture(kind, task, expected):
    model = _load(kind)
    config = lora.lora_config(model, r=4, alpha=8, targets="qv")
    assert config.task_type == task
    peft_model = lora.add_lora(model, config)
    assert _lora_leaves(peft_model) == expected
    n_layers = {"llama": 2, "t5": 2 + 2 * 2, "roberta": 2, "bert": 6}[kind]  # T5: encoder self, decoder self+cross
    assert len(_lora_names(peft_model)) == 2 * n_layers
    if task == "SEQ_CLS":  # a fresh head trains in full and is saved with the adapter
        assert "classifier" in config.modules_to_save  # PEFT adds its usual head names ("score") as well
        head = peft_model.base_model.model.classifier
        assert isinstance(head, ModulesToSaveWrapper)
        assert all(p.requires_grad for p in head.modules_to_save["default"].parameters())


@pytest.mark.parametrize("kind", ["llama", "t5", "roberta"])
def test_all_linear_excludes_the_head(kind):
    model = _load(kind)
    peft_model = lora.add_lora(model, lora.lora_config(model, r=4, alpha=8))
    names = _lora_names(peft_model)
    assert not any("lm_head" in n or "classifier" in n for n in names)
    if kind == "llama":
        assert _lora_leaves(peft_model) == LLAMA_ALL
        assert len(names) == 2 * 7
        assert type(peft_model.base_model.model.lm_head) is torch.nn.Linear
    elif kind == "t5":
        assert {"q", "k", "v", "o", "wi_0", "wi_1", "wo"} <= _lora_leaves(peft_model)
        assert type(peft_model.base_model.model.lm_head) is torch.nn.Linear
    else:  # RoBERTa: "dense" is both an encoder layer (LoRA) and a layer of the head (trained in full)
        assert "roberta.encoder.layer.0.attention.output.dense" in {n.split("base_model.model.")[-1] for n in names}
        assert not isinstance(peft_model.base_model.model.classifier.modules_to_save["default"].dense, LoraLayer)


def test_trainable_summary_equals_a_manual_count():
    model = load_causal_lm("tiny:llama")
    peft_model = lora.add_lora(model, lora.lora_config(model, r=4, alpha=8, targets="qv"))
    summary = lora.trainable_summary(peft_model)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    # by hand: hidden 64, 4 heads of 16, 2 KV heads -> q: 64->64, v: 64->32; LoRA adds r*(d_in+d_out)
    assert trainable == 2 * (4 * (64 + 64) + 4 * (64 + 32)) == 1792
    assert summary == {"trainable": trainable, "total": total, "percent": 100 * trainable / total}
    assert (summary["trainable"], summary["total"]) == peft_model.get_nb_trainable_parameters()
    assert str(summary) == lora.format_summary(summary) == (
        f"trainable params: 1,792 || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
    assert lora.format_summary({"trainable": 1234, "total": 5678, "percent": 100 * 1234 / 5678}) == \
        "trainable params: 1,234 || all params: 5,678 || trainable%: 21.7330"


def test_4bit_model_targets_and_counts():
    model = prepare_for_training(load_causal_lm("tiny:llama", load_in_4bit=True), gradient_checkpointing=False)
    assert is_4bit(model)
    config = lora.lora_config(model, r=4, alpha=8)
    assert set(config.target_modules) == LLAMA_ALL
    peft_model = lora.add_lora(model, config)
    summary = lora.trainable_summary(peft_model)
    assert (summary["trainable"], summary["total"]) == peft_model.get_nb_trainable_parameters()
    # a packed 4-bit weight counts as its unpacked number of values: same total as the fp32 model
    fp32 = load_causal_lm("tiny:llama")
    assert summary["total"] == lora.trainable_summary(lora.add_lora(fp32, lora.lora_config(fp32, r=4, alpha=8)))["total"]


def test_one_step_moves_lora_weights_and_nothing_else():
    torch.manual_seed(0)
    model = load_causal_lm("tiny:llama")
    peft_model = lora.add_lora(model, lora.lora_config(model, r=4, alpha=8, dropout=0.0))
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    assert {n for n, p in peft_model.named_parameters() if p.requires_grad} == {n for n in before if "lora_" in n}
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    x = torch.randint(5, 2000, (2, 16))

    def step():
        peft_model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()

    step()
    after = dict(peft_model.named_parameters())
    for n, p in after.items():
        if "lora_B" in n:
            assert not torch.equal(p, before[n]), f"{n} did not move"
        elif "lora_A" in n:  # B starts at 0, so A's gradient B^T dL/dh is exactly 0 on the first step
            assert torch.equal(p, before[n]), f"{n} moved on step 1"
        else:
            assert torch.equal(p, before[n]), f"base weight {n} moved"
    step()  # now B != 0 and A learns too
    assert all(not torch.equal(p, before[n]) for n, p in peft_model.named_parameters() if "lora_A" in n)


def test_unknown_architecture_names_the_class_and_the_supported_ones():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=32, n_positions=16))
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as e:
        lora.lora_config(model)
    assert all(t in str(e.value) for t in ("llama", "qwen2", "t5", "roberta", "bert"))
    with pytest.raises(ValueError, match="'all-linear' or 'qv'"):
        lora.lora_config(load_causal_lm("tiny:llama"), targets="qkv")
