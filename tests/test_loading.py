"""Precision decided from real hardware support, the fp16 overflow guard, pinned revisions.

A T4 is simulated by monkeypatching torch.cuda: CUDA present, compute capability 7.5, and
``is_bf16_supported()`` True only when emulation counts (what torch answers on a real T4).
"""
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from sawyer import check, loading, reward


def _fake_gpu(monkeypatch, capability):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    # torch's answer: emulated bf16 counts by default, real bf16 needs sm_80+
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or capability >= (8, 0))


@pytest.fixture
def t4(monkeypatch):
    _fake_gpu(monkeypatch, (7, 5))


def test_t4_gets_fp16_everywhere(t4):
    assert torch.cuda.is_bf16_supported()  # the trap: True on a T4 because emulation counts
    assert loading.bf16_in_hardware() is False
    assert loading.precision() == "fp16"
    assert loading.compute_dtype() == torch.float16
    assert loading.quantization_config().bnb_4bit_compute_dtype == torch.float16
    assert reward.compute_dtype() == torch.float16  # the reward-model loop's autocast and GradScaler
    from sawyer import sft
    assert sft.precision_flags() == {"bf16": False, "fp16": True}


def test_a100_gets_bf16(monkeypatch):
    _fake_gpu(monkeypatch, (8, 0))
    assert loading.precision() == "bf16" and loading.compute_dtype() == torch.bfloat16
    from sawyer import sft
    assert sft.precision_flags() == {"bf16": True, "fp16": False}


def test_cpu_gets_fp32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loading.precision() == "fp32" and loading.compute_dtype() == torch.float32
    from sawyer import sft
    assert sft.precision_flags() == {"bf16": False, "fp16": False}


def test_preflight_on_a_t4_reports_fp16_and_no_bf16(t4, monkeypatch):
    class Props:
        name, total_memory = "Tesla T4", 15 * 1024 ** 3
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props)
    from sawyer.presets import get_preset
    info = check.preflight(get_preset("t4"), echo=lambda *a: None)
    assert info["bf16"] is False and info["compute_dtype"] == "float16"


# --------------------------------------------------------------------------- the fp16 overflow guard
def _qwen2_with_a_massive_activation():
    """A tiny Qwen2 whose layer-0 MLP writes ~6e5 into one residual channel, as real Qwen2.5 layers do."""
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = Qwen2ForCausalLM(cfg).eval()
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mlp.gate_proj.weight.mul_(40)
        mlp.up_proj.weight.mul_(40)
        mlp.down_proj.weight[0].copy_(torch.sign(mlp.down_proj.weight[0]) * 2e3)
    return model


def test_fp16_overflow_of_qwen2_is_guarded():
    model = _qwen2_with_a_massive_activation()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        assert out.hidden_states[1].abs().max() > 65504  # the fp32 residual stream leaves fp16's range
        ref = out.logits
        model.half()
        assert not model(ids).logits.isfinite().all()  # unguarded fp16: inf, then NaN
        assert loading.guard_fp16_overflow(model) == 2
        assert loading.guard_fp16_overflow(model) == 2  # idempotent: one hook per layer
        guarded = model(ids).logits.float()
    assert guarded.isfinite().all()
    assert torch.equal(guarded.argmax(-1), ref.argmax(-1))  # the clamp keeps the fp32 answer
    torch.testing.assert_close(guarded, ref, atol=5e-3, rtol=0)


def test_the_guard_leaves_fp32_untouched():
    model = _qwen2_with_a_massive_activation()
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        before = model(ids).logits
        loading.guard_fp16_overflow(model)
        assert torch.equal(model(ids).logits, before)


def test_fp16_loads_are_guarded(tiny_paths):
    model = loading.load_causal_lm(tiny_paths["llama"], dtype=torch.float16)
    assert model.dtype == torch.float16
    assert all(getattr(layer, "_sawyer_fp16_guard", False) for layer in model.model.layers)
    assert not any(getattr(m, "_sawyer_fp16_guard", False)
                   for m in loading.load_causal_lm(tiny_paths["llama"]).modules())  # fp32 on CPU: no hook


# --------------------------------------------------------------------------- revisions
def test_split_revision():
    assert loading.split_revision("Qwen/Qwen2.5-1.5B@1f499a8e") == ("Qwen/Qwen2.5-1.5B", "1f499a8e")
    assert loading.split_revision("roberta-base") == ("roberta-base", None)
    assert loading.split_revision("tiny:llama") == ("tiny:llama", None)
    with pytest.raises(ValueError, match="org/name@revision"):
        loading.split_revision("Qwen/Qwen2.5-1.5B@")


def test_the_revision_reaches_from_pretrained(monkeypatch):
    seen = {}

    def fake(repo, **kwargs):
        seen.update(repo=repo, revision=kwargs.get("revision"), safetensors=kwargs.get("use_safetensors"))
        raise OSError("stop here")

    monkeypatch.setattr(loading.AutoModelForSequenceClassification, "from_pretrained", fake)
    with pytest.raises(loading.ModelLoadError, match="textattack/roberta-base-CoLA@abc123"):
        loading.load_classifier("textattack/roberta-base-CoLA@abc123")
    assert seen == {"repo": "textattack/roberta-base-CoLA", "revision": "abc123", "safetensors": True}


def test_hub_presets_pin_every_model_and_dataset_to_a_commit():
    import re

    from sawyer.presets import UNPINNED, get_preset
    assert set(UNPINNED) <= {"argilla/news-summary", "guanaco/guanaco"}  # the known gaps only; shrink, never grow
    for name in ("t4", "a100"):
        p = get_preset(name)
        ids = [p.summary.policy, p.summary.dataset, p.summary.cola_model, p.summary.sentiment_model,
               p.sft.base_model, *p.sft.datasets, p.reward.base_model, p.ppo.dataset, p.eval.truthful_qa, p.eval.mmlu]
        for hub_id in ids:
            repo, revision = loading.split_revision(hub_id)
            if repo in UNPINNED:
                continue
            assert revision and re.fullmatch(r"[0-9a-f]{40}", revision), f"{name}: {hub_id} has no pinned commit"
        assert re.search(r"/[0-9a-f]{40}/", p.reward.comparison_file), p.reward.comparison_file


# --------------------------------------------------------------------------- an fp16 SFT step, on CPU
def _sft_gradients(cfg, examples, tmp_path, fp16: bool, monkeypatch):
    """LoRA/marker-row gradients of one SFT step through the real Trainer path (fp16: the T4 path)."""
    import copy

    from transformers import TrainerCallback

    from sawyer import sft

    torch.manual_seed(0)
    model, tok, _ = _SFT_MODEL
    model = copy.deepcopy(model)
    if fp16:
        for p in model.parameters():
            if not p.requires_grad:  # the frozen base in fp16, as loaded on a T4
                p.data = p.data.half()
    monkeypatch.setattr(loading, "precision", lambda: "fp16" if fp16 else "fp32")
    args = sft.training_arguments(cfg, tmp_path / ("fp16" if fp16 else "fp32"), progress=False)
    args.max_grad_norm = 1e9  # clip nothing, but go through the clip path, which unscales fp16 gradients
    grads = {}

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            grads.update({n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad})

    trainer = sft._adapter_only_trainer(model=model, args=args, train_dataset=examples,
                                        data_collator=sft.CompletionOnlyCollator(tok.pad_token_id),
                                        processing_class=tok, callbacks=[Grab()])
    if fp16:  # accelerate switches fp16 autocast + GradScaler on for GPUs only; switch them on for this CPU
        assert trainer.accelerator.mixed_precision == "fp16"
        trainer.accelerator.native_amp = True  # forward under torch.autocast(float16), as on a T4
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu")  # what accelerate builds on CUDA, for the CPU
    trainer.train()
    scaler = trainer.accelerator.scaler
    return grads, model, scaler


_SFT_MODEL = None


def test_fp16_sft_step_matches_fp32(tmp_path, monkeypatch):
    """Base in fp16 under fp16 autocast, fp32 LoRA masters, GradScaler: gradients within 2% of fp32's.

    Tolerance: the relative L2 error of the whole LoRA gradient, ||g16 - g32|| / ||g32|| < 0.02, and a
    cosine similarity > 0.999; fp16's 10-bit mantissa gives ~1e-3 relative error per operation.
    """
    import dataclasses

    from sawyer import sft
    from sawyer.data import load_conversations
    from sawyer.presets import get_preset

    global _SFT_MODEL
    cfg = dataclasses.replace(get_preset("tiny").sft, max_steps=1, batch_size=4, gradient_accumulation_steps=1,
                              lora_targets="qv")
    torch.manual_seed(0)
    _SFT_MODEL = sft.prepare_sawyer_model(cfg, verbose=False)
    conversations, _ = load_conversations(cfg.datasets, max_rows=8)
    examples, _ = sft.build_examples(conversations[:4], _SFT_MODEL[1], cfg.max_seq_len)
    g32, _, scaler32 = _sft_gradients(cfg, examples, tmp_path, False, monkeypatch)
    g16, model16, scaler16 = _sft_gradients(cfg, examples, tmp_path, True, monkeypatch)
    assert scaler32 is None and scaler16 is not None and scaler16.get_scale() > 1  # loss scaling is on
    assert all(p.dtype == torch.float32 for p in model16.parameters() if p.requires_grad)  # fp32 masters
    assert any(p.dtype == torch.float16 for p in model16.parameters())
    assert g16.keys() == g32.keys() and any("lora_A" in n for n in g32)
    a = torch.cat([g32[n].flatten() for n in sorted(g32)])
    b = torch.cat([g16[n].flatten() for n in sorted(g16)])
    assert a.norm() > 0 and b.isfinite().all()
    rel = float((b - a).norm() / a.norm())
    print(f"fp16 vs fp32 LoRA gradients: relative L2 error {rel:.2e}")
    assert rel < 0.02
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.999


# --------------------------------------------------------------------------- the hub token on Colab
def _fake_colab(monkeypatch, behaviour):
    """Install a stand-in for ``google.colab.userdata`` whose ``get`` returns a value or raises by class name."""
    import sys
    import types

    userdata = types.ModuleType("google.colab.userdata")
    userdata.NotebookAccessError = type("NotebookAccessError", (Exception,), {})
    userdata.SecretNotFoundError = type("SecretNotFoundError", (Exception,), {})

    def get(key):
        assert key == "HF_TOKEN"
        if isinstance(behaviour, str) and behaviour in ("NotebookAccessError", "SecretNotFoundError"):
            raise getattr(userdata, behaviour)(key)
        return behaviour

    userdata.get = get
    colab = types.ModuleType("google.colab")
    colab.userdata = userdata
    google = sys.modules.get("google") or types.ModuleType("google")
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setattr(google, "colab", colab, raising=False)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.userdata", userdata)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)


def test_preflight_reads_the_colab_secret_and_never_prints_it(monkeypatch):
    from sawyer.presets import get_preset
    _fake_colab(monkeypatch, "hf_secret_value_123")
    lines = []
    info = check.preflight(get_preset("a100"), echo=lines.append)
    assert info["hub_token"] == "present (Colab secret HF_TOKEN)"
    assert not any("gated" in a for a in info["advice"])
    assert "hf_secret_value_123" not in "\n".join(lines) + repr(info)


def test_colab_secret_without_notebook_access_is_told_apart_from_no_secret(monkeypatch):
    from sawyer.presets import get_preset
    _fake_colab(monkeypatch, "NotebookAccessError")
    token, where = check.hub_token()
    assert token is None and "exists but this notebook has no access" in where and "Notebook access" in where
    with pytest.raises(RuntimeError, match="no access"):
        check.hub_login(get_preset("a100"), echo=lambda *a: None)
    _fake_colab(monkeypatch, "SecretNotFoundError")
    token, where = check.hub_token()
    assert token is None and "add a Colab secret named HF_TOKEN" in where
    with pytest.raises(RuntimeError, match="add a Colab secret"):
        check.hub_login(get_preset("a100"), echo=lambda *a: None)


def test_environment_token_wins_and_login_never_echoes_it(monkeypatch):
    from sawyer.presets import get_preset
    monkeypatch.setenv("HF_TOKEN", "hf_env_value_456")
    seen = {}
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "login", lambda token, **k: seen.update(token=token))
    lines = []
    assert check.hub_login(get_preset("a100"), echo=lines.append) is True
    assert seen["token"] == "hf_env_value_456" and "hf_env_value_456" not in "\n".join(lines)


# --------------------------------------------------------------------------- fp16 reward-model training, on CPU
def test_fp16_reward_model_training_tracks_fp32(tmp_path, monkeypatch):
    """The T4 path of ``reward.train_reward_model`` (fp16 autocast, fp32 weights, GradScaler), run on the CPU.

    Tolerance: after 4 AdamW steps the fp16 run's logged losses are within 2e-2 of fp32's and its scores on
    held-out pairs within 2e-2; the weights stay fp32 and the scaler really scaled (scale > 1).
    """
    from transformers import BertConfig, BertForSequenceClassification

    from sawyer import tiny
    from sawyer.presets import RewardConfig
    from types import SimpleNamespace as Pair  # the ComparisonPair fields the reward loop reads

    tok = loading.load_tokenizer(str(tiny.build("minilm")))
    torch.manual_seed(0)
    cfg_model = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, num_labels=1, problem_type="regression")
    BertForSequenceClassification(cfg_model).save_pretrained(tmp_path / "rm")
    qs = ["What do cats eat?", "Why does it rain?", "How is bread made?", "Where is Paris?"]
    good = ["Cats eat fish and meat.", "Water vapour condenses into drops.", "Flour, water, yeast, then bake.",
            "Paris is in France."]
    pairs = [Pair(question=q, better=g, worse=b, score_diff=1.0) for q, g, b in zip(qs, good, good[1:] + good[:1])]
    cfg = RewardConfig(max_length=32, learning_rate=1e-3, batch_size=2, max_steps=4, seed=0)
    scalers = []

    class SpyScaler(torch.amp.GradScaler):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            scalers.append(self)

    monkeypatch.setattr(torch.amp, "GradScaler", SpyScaler)
    results = {}
    for dtype in (torch.float32, torch.float16):
        monkeypatch.setattr(reward, "compute_dtype", lambda d=dtype: d)
        model = loading.load_classifier(str(tmp_path / "rm"))
        hist = reward.train_reward_model(model, tok, pairs, cfg, progress=False, log_every=1)
        assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
        monkeypatch.setattr(reward, "compute_dtype", lambda: torch.float32)
        results[dtype] = ([h["loss/pairwise"] for h in hist], reward.score_pairs(model, tok, qs, good))
    assert not scalers[0].is_enabled() and scalers[1].is_enabled() and scalers[1].get_scale() > 1
    loss32, score32 = results[torch.float32]
    loss16, score16 = results[torch.float16]
    assert len(loss16) == 4 and all(abs(a - b) < 2e-2 for a, b in zip(loss32, loss16)), (loss32, loss16)
    torch.testing.assert_close(score16, score32, atol=2e-2, rtol=0)
