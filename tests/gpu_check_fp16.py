"""GPU check (not collected by pytest): the T4 precision path on a real GPU, Qwen2.5-1.5B shapes, random weights.

    .venv/bin/python tests/gpu_check_fp16.py            # on the GPU machine (no hub needed: config built here)
    .venv/bin/python tests/gpu_check_fp16.py --tiny     # smoke run of the same code on a CPU, tiny shapes

What it checks and prints (one JSON line per check):
1. ``precision``: what ``sawyer.loading.precision()`` picks on this GPU (bf16 on sm_80+, fp16 on a T4);
2. ``fp16_guard``: a Qwen2 forward in fp16 with a planted massive activation: inf/NaN without
   ``guard_fp16_overflow``, finite with it;
3. ``fp16_sft_step``: one LoRA step on the fp16 base (fp16 autocast + GradScaler, the T4 arithmetic, run on any GPU;
   the Trainer does the same through accelerate), against the same step in fp32
   (bf16-free): relative L2 error of the LoRA gradients (expected < 0.02), wall time and peak memory.
"""
import argparse
import copy
import json
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from sawyer import loading, lora

QWEN25_15B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)


def emit(**record):
    print(json.dumps(record), flush=True)


def lora_grads(model, ids, fp16: bool):
    """One forward/backward as the Trainer does it on CUDA: autocast(fp16) + GradScaler, or plain fp32."""
    model.zero_grad(set_to_none=True)
    dev = ids.device
    scaler = torch.amp.GradScaler(dev.type, enabled=fp16)
    with torch.autocast(dev.type, dtype=torch.float16, enabled=fp16):
        loss = model(input_ids=ids, labels=ids).loss
    scaler.scale(loss).backward()
    inv = 1.0 / scaler.get_scale() if fp16 else 1.0
    return {n: p.grad.float() * inv for n, p in model.named_parameters() if p.requires_grad}, loss.item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU smoke run of this script)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    dev = loading.device()
    emit(check="precision", device=str(dev), gpu=torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
         capability=list(torch.cuda.get_device_capability(0)) if dev.type == "cuda" else None,
         precision=loading.precision(), emulated_bf16_claim=torch.cuda.is_bf16_supported() if dev.type == "cuda" else None)

    cfg = Qwen2Config(**(TINY if args.tiny else QWEN25_15B))
    torch.manual_seed(0)
    # 2. the guard: a planted massive activation in layer 0's MLP (as real Qwen2.5 layers grow)
    small = Qwen2ForCausalLM(Qwen2Config(**TINY)).to(dev).eval()
    mlp = small.model.layers[0].mlp
    with torch.no_grad():
        mlp.gate_proj.weight.mul_(40), mlp.up_proj.weight.mul_(40)
        mlp.down_proj.weight[0].copy_(torch.sign(mlp.down_proj.weight[0]) * 2e3)
        ids = torch.randint(0, TINY["vocab_size"], (2, 16), device=dev)
        ref = small(ids).logits.float()
        small.half()
        unguarded = bool(small(ids).logits.isfinite().all())
        loading.guard_fp16_overflow(small)
        out = small(ids).logits.float()
    emit(check="fp16_guard", unguarded_finite=unguarded, guarded_finite=bool(out.isfinite().all()),
         argmax_agree=float((out.argmax(-1) == ref.argmax(-1)).float().mean()))

    # 3. one LoRA step, fp16 (T4 path) vs fp32, same random weights
    base = Qwen2ForCausalLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, 64 if args.tiny else args.seq), device=dev)
    results = {}
    for name in ("fp32", "fp16"):
        model = copy.deepcopy(base).to(dev, torch.float16 if name == "fp16" else torch.float32)
        if name == "fp16":
            loading.guard_fp16_overflow(model)
        torch.manual_seed(1)  # the same LoRA initialisation in both runs
        model = lora.add_lora(model, lora.lora_config(model, r=16, alpha=32, dropout=0.0, targets="all-linear"))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # fp32 masters, as sawyer.sft.train_sft does
        if dev.type == "cuda":
            torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        grads, loss = lora_grads(model, ids, fp16=name == "fp16")
        if dev.type == "cuda":
            torch.cuda.synchronize()
        results[name] = dict(grads=grads, loss=loss, seconds=round(time.perf_counter() - t, 3),
                             peak_gib=round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if dev.type == "cuda" else None)
        del model
    a = torch.cat([g.flatten() for _, g in sorted(results["fp32"]["grads"].items())])
    b = torch.cat([g.flatten() for _, g in sorted(results["fp16"]["grads"].items())])
    emit(check="fp16_sft_step", shapes="tiny" if args.tiny else "Qwen2.5-1.5B", batch=args.batch, seq=ids.shape[1],
         rel_l2_error=float((b - a).norm() / a.norm()), finite=bool(b.isfinite().all()),
         loss_fp32=results["fp32"]["loss"], loss_fp16=results["fp16"]["loss"],
         seconds={k: v["seconds"] for k, v in results.items()}, peak_gib={k: v["peak_gib"] for k, v in results.items()})


if __name__ == "__main__":
    main()
