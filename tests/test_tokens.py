"""Tests of sawyer.tokens: new input *and* output rows equal the phrase means (computed here from the
pre-resize matrices), old rows untouched, markers round-trip, tied and 4-bit models, idempotence, and an
adapter that saves only the marker rows and reloads to identical logits."""
import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, LlamaForCausalLM

from sawyer import lora, tokens
from sawyer.loading import is_4bit, load_causal_lm, load_tokenizer, resolve
from sawyer.presets import DEFAULT_PHRASES

TEXT = "###HUMAN### hi there ###BOT### sup ###STOP###"


@pytest.fixture()
def llama():
    return load_causal_lm("tiny:llama"), load_tokenizer("tiny:llama")


def _expected_means(tok, weight_before):
    """Mean of each phrase's rows in the *pre-resize* matrix, phrase tokenised without BOS."""
    out = {}
    for marker, phrase in DEFAULT_PHRASES.items():
        ids = tok(phrase, add_special_tokens=False)["input_ids"]
        assert tok.bos_token_id not in ids and len(ids) >= 2
        out[marker] = weight_before[ids].mean(0)
    return out


def _check_rows(model, tok, ids, emb_before, out_before=None):
    old = emb_before.shape[0]
    emb = model.get_input_embeddings().weight
    assert sorted(ids.values()) == list(range(old, old + 3))
    assert torch.equal(emb[:old], emb_before)  # old rows untouched
    for marker, mean in _expected_means(tok, emb_before).items():
        assert torch.equal(emb[ids[marker]], mean), marker
    if out_before is not None:  # the untied lm_head gets its own phrase means (the original's bug: it did not)
        out = model.get_output_embeddings().weight
        assert torch.equal(out[:old], out_before)
        for marker, mean in _expected_means(tok, out_before).items():
            assert torch.equal(out[ids[marker]], mean), marker
            assert not torch.equal(out[ids[marker]], emb[ids[marker]])


def test_new_input_and_output_rows_are_phrase_means(llama):
    model, tok = llama
    assert not tokens.is_tied(model)
    emb_before = model.get_input_embeddings().weight.detach().clone()
    out_before = model.get_output_embeddings().weight.detach().clone()
    ids = tokens.add_special_tokens(model, tok)
    assert set(ids) == set(DEFAULT_PHRASES)
    assert model.get_output_embeddings().weight.shape == (len(tok), 64) == (emb_before.shape[0] + 3, 64)
    _check_rows(model, tok, ids, emb_before, out_before)


def test_markers_round_trip(llama):
    model, tok = llama
    ids = tokens.add_special_tokens(model, tok)
    for marker, i in ids.items():  # one id, never split into '#', '##', 'HUMAN' ...
        assert tok(marker, add_special_tokens=False)["input_ids"] == [i]
    for text in (TEXT, "hi###BOT###sup###STOP###"):  # with spaces and glued to words
        enc = tok(text, add_special_tokens=False)["input_ids"]
        assert [enc.count(i) for i in ids.values()] == [text.count(m) for m in ids]
        assert tok.decode(enc) == text
    assert [t for t in tok.tokenize(TEXT) if t.startswith("#")] == ["###HUMAN###", "###BOT###", "###STOP###"]


def test_tied_embeddings_are_set_once():
    cfg = AutoConfig.from_pretrained(resolve("tiny:llama"))
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    model, tok = LlamaForCausalLM(cfg), load_tokenizer("tiny:llama")
    assert tokens.is_tied(model)
    emb_before = model.get_input_embeddings().weight.detach().clone()
    ids = tokens.add_special_tokens(model, tok)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    _check_rows(model, tok, ids, emb_before)
    assert list(tokens.token_indices_for_lora(model, ids)) == ["model.embed_tokens"]  # PEFT ties lm_head itself


def test_4bit_model():
    model, tok = load_causal_lm("tiny:llama", load_in_4bit=True), load_tokenizer("tiny:llama")
    assert is_4bit(model)
    emb_before = model.get_input_embeddings().weight.detach().clone()
    out_before = model.get_output_embeddings().weight.detach().clone()
    ids = tokens.add_special_tokens(model, tok)
    _check_rows(model, tok, ids, emb_before, out_before)


def test_idempotent_and_keeps_trained_rows(llama):
    model, tok = llama
    ids = tokens.add_special_tokens(model, tok)
    n_tok, n_rows = len(tok), model.get_input_embeddings().weight.shape[0]
    with torch.no_grad():  # as if the rows had been trained
        model.get_input_embeddings().weight[list(ids.values())] = 7.0
    assert tokens.add_special_tokens(model, tok) == ids
    assert (len(tok), model.get_input_embeddings().weight.shape[0]) == (n_tok, n_rows)
    assert (model.get_input_embeddings().weight[list(ids.values())] == 7.0).all()


def test_pad_to_multiple_of_and_generation_stays_sane(llama):
    model, tok = llama
    special = (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, model.generation_config.eos_token_id)
    ids = tokens.add_special_tokens(model, tok, pad_to_multiple_of=64)
    rows = -(-len(tok) // 64) * 64
    assert model.get_input_embeddings().weight.shape[0] == model.get_output_embeddings().weight.shape[0] == rows
    assert model.config.vocab_size == rows and max(ids.values()) < len(tok) <= rows
    assert special == (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, model.generation_config.eos_token_id)
    enc = tok("###HUMAN### hi ###BOT###", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, enc["input_ids"].shape[1] + 4)


def _sft_model(model, tok, *, with_rows=True):
    ids = tokens.add_special_tokens(model, tok)
    indices = tokens.token_indices_for_lora(model, ids) if with_rows else None
    return lora.add_lora(model, lora.lora_config(model, r=4, alpha=8, dropout=0.0, targets="qv",
                                                 trainable_token_indices=indices)), ids


def test_adapter_saves_only_new_rows_and_reloads_identically(llama, tmp_path):
    model, tok = llama
    means = _expected_means(tok, model.get_input_embeddings().weight.detach().clone())
    peft_model, ids = _sft_model(model, tok)
    assert tokens.token_indices_for_lora(model, ids) == {"model.embed_tokens": [2048, 2049, 2050],
                                                         "lm_head": [2048, 2049, 2050]}
    # one training step on a marker text: LoRA and the marker rows (input and output) move
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    x = tok(TEXT, return_tensors="pt")
    peft_model(**x, labels=x["input_ids"]).loss.backward()
    opt.step()
    peft_model.eval()
    with torch.no_grad():
        logits = peft_model(**x).logits

    size = tokens.save_adapter(peft_model, tok, tmp_path)
    assert size == tokens.adapter_size(tmp_path) == sum(p.stat().st_size for p in tmp_path.iterdir())
    vocab, hidden = len(tok), 64
    embedding_bytes = 2 * vocab * hidden * 4  # fp32 input + output matrices, what PEFT's "auto" would store
    weights = tmp_path / "adapter_model.safetensors"
    with safe_open(str(weights), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        rows = {k: f.get_tensor(k) for k in f.keys() if "trainable_tokens" in k}
    assert all(vocab not in s for s in shapes.values())  # no full matrix anywhere
    assert sorted(s for k, s in shapes.items() if "trainable_tokens" in k) == [(3, hidden), (3, hidden)]
    assert weights.stat().st_size < 0.05 * embedding_bytes
    emb_rows = next(v for k, v in rows.items() if "embed_tokens" in k)
    head_rows = next(v for k, v in rows.items() if "lm_head" in k)
    assert not torch.equal(emb_rows[0], means["###STOP###"])  # the trained rows were saved, not the init
    assert not torch.equal(head_rows, emb_rows)

    reloaded, tok2 = tokens.load_adapter(resolve("tiny:llama"), tmp_path)
    assert {m: tok2.convert_tokens_to_ids(m) for m in ids} == ids
    enc2 = tok2(TEXT, return_tensors="pt")
    assert torch.equal(enc2["input_ids"], x["input_ids"])
    with torch.no_grad():
        assert torch.equal(reloaded(**enc2).logits, logits)
        with reloaded.disable_adapter():  # the base under the adapter starts from the phrase means again
            base_emb = reloaded.get_base_model().get_input_embeddings().token_adapter.base_layer.weight
            assert torch.equal(base_emb[ids["###STOP###"]], means["###STOP###"])


def test_reload_4bit_for_training_keeps_lora_trainable(llama, tmp_path):
    model, tok = llama
    peft_model, ids = _sft_model(model, tok)
    tokens.save_adapter(peft_model, tok, tmp_path)
    reloaded, _ = tokens.load_adapter("tiny:llama", tmp_path, load_in_4bit=True, is_trainable=True)
    assert is_4bit(reloaded)
    trainable = {n for n, p in reloaded.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("trainable_tokens" in n for n in trainable)


def test_save_refuses_to_drop_the_marker_rows(llama, tmp_path):
    model, tok = llama
    peft_model, _ = _sft_model(model, tok, with_rows=False)
    with pytest.raises(ValueError, match="token_indices_for_lora"):
        tokens.save_adapter(peft_model, tok, tmp_path)


def test_format_bytes():
    assert [tokens.format_bytes(n) for n in (0, 1023, 1536, 5 * 1024 ** 2, int(2.3 * 1024 ** 3))] == \
        ["0 B", "1023 B", "1.5 KiB", "5.0 MiB", "2.3 GiB"]
