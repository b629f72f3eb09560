"""Time one PPO step of ours against classic TRL 0.11.4, phase by phase, on a random-weight Llama.

    python -m sawyer.bench ours     --rounds 3                 # our side only (no extra venv needed)
    python -m sawyer.bench compare  --rounds 3 --out runs/bench/cpu   # ours vs classic TRL, alternated
    python -m sawyer.bench probe                               # matmul rate and memory bandwidth only

What one measurement is (the protocol of ``../shared/bench/README.md``, reproduced here):

1. A random-weight ``LlamaForCausalLM`` of the given shape (fp32, seed 0) is saved once under
   ``runs/bench/`` and every side loads that same folder. Random weights are fine for timing: the work of a
   step depends on the shape, not on the values, because every response is forced to exactly ``--new``
   tokens (min = max new tokens; the stop token cannot be sampled).
2. Each run is a fresh process (so its peak RSS is its own), ``OMP_NUM_THREADS`` and torch threads set to
   ``--threads`` on both sides, ``--steps`` PPO steps on random prompts of ``--prompt`` tokens, the first
   step discarded as warm-up. Ours: ``sawyer.ppo`` setup / rollout / score / update, LoRA r=16 alpha 32 on
   q_proj/v_proj, batch = mini-batch, 2 PPO epochs, lr 1.41e-5, a trivial reward (response words / new).
3. ``compare`` alternates the three sides round by round (peer-seed, peer-best, ours), so a change of machine
   load hits all of them alike, and reports medians, min/max and the per-round ratios ours / peer.
   ``peer-seed`` is classic TRL as the original workshop used it (per-query generation, an explicit
   reference copy, mini-batch 1); ``peer-best`` is classic TRL at its best (batched generation, the LoRA
   policy with its adapter disabled as reference, mini-batch = batch). The peer side is the harness
   ``../shared/bench/peer_trl011.py`` run by the python of its own venv (``.venv-trl011``; see
   BENCHMARKS.md); it is run, never copied.

Phases: ``generate`` (sampling), ``logprobs`` (the policy/reference/value passes; without gradient
checkpointing ours keeps the policy pass's graph, and its first training minibatch starts from it), ``score``
(the reward function; negligible here by design), ``train`` (advantages + the clipped updates) and ``other``
(the rest of the wall-clock step). Peak memory: RSS from ``resource.getrusage`` on CPU; on a GPU also the
peak *reserved* CUDA memory (ours) or peak allocated (what the peer harness reports).

Floors (BENCHMARKS.md): ``probe`` measures a matmul rate at the model's own MLP shape and a copy bandwidth;
``floors`` turns the shape into FLOPs and weight bytes: a decode step cannot be faster than reading the
weights once, and a training pass cannot be faster than its FLOPs at the measured matmul rate.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER_SCRIPT = ROOT.parent / "shared" / "bench" / "peer_trl011.py"
PEER_PYTHON = ROOT / ".venv-trl011" / "bin" / "python"
PHASES = ("generate", "logprobs", "score", "train", "other")
SIDES = ("peer-seed", "peer-best", "ours")
#: NF4 with double quantisation: 4 bits + 0.127 bits of scales per weight (Dettmers et al. 2023, QLoRA)
NF4_BYTES = 4.127 / 8


# ============================================================================ 1. the model folder
def model_folder(a) -> Path:
    """The random-weight Llama folder of ``a``'s shape: ``--model`` if given, else built once in ``--models``."""
    if a.model:
        folder = Path(a.model)
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"--model {folder}: no config.json there; leave --model out to build one")
        return folder
    kv = a.kv or a.heads
    folder = Path(a.models) / f"llama-h{a.hidden}-l{a.layers}-a{a.heads}-kv{kv}-i{a.inter}-v{a.vocab}"
    if not (folder / "config.json").exists():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)  # the same recipe as ../shared/bench/make_llama.py
        cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.inter,
                          num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=kv,
                          max_position_embeddings=2048, bos_token_id=None, eos_token_id=None, pad_token_id=0)
        LlamaForCausalLM(cfg).float().save_pretrained(folder)
    return folder


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer: id 0 = ``<pad>``, id 1 = ``</s>`` (EOS), id i >= 2 = the word ``t{i}``.

    Prompts are written as ``"t17 t4242 ..."`` so both sides see the same token ids (the peer is handed ids);
    whitespace splitting makes a prompt of n words exactly n tokens. The special tokens must not be words of
    the form ``t{i}``: added tokens match inside words, so a pad token "t1" would split "t16406" in two.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, **{f"t{i}": i for i in range(2, vocab_size)}}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="<pad>", eos_token="</s>")


# ============================================================================ 2. our side (one process)
def worker(a) -> None:
    """Our PPO step, ``a.steps`` times, in this process. Prints ``STEP {json}`` lines and ``RESULT {json}``."""
    import torch

    torch.set_num_threads(a.threads)
    from sawyer import loading, lora, ppo

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    fourbit = bool(a.fourbit and cuda)
    base = loading.load_causal_lm(str(a.model), load_in_4bit=fourbit)  # fp32 on CPU, bf16/fp16 on a GPU
    if fourbit:
        base = loading.prepare_for_training(base, gradient_checkpointing=bool(a.checkpointing))
    policy = lora.add_lora(base, lora.lora_config(base, r=16, alpha=32, dropout=0.05, targets="qv"))
    vocab = base.config.vocab_size
    tok = word_tokenizer(vocab)
    config = ppo.PPOConfig(learning_rate=1.41e-5, batch_size=a.batch, mini_batch_size=a.batch, ppo_epochs=2,
                           min_new_tokens=a.new, max_new_tokens=a.new, gradient_checkpointing=bool(a.checkpointing))
    state = ppo.setup(policy, tok, config)  # a fresh adapter: the reference is the policy with it disabled
    load_s = time.perf_counter() - t0

    def reward_fn(prompts, responses):  # trivial on purpose: the benchmark times PPO, not a reward model
        return torch.tensor([len(r.split()) / a.new for r in responses])

    g = torch.Generator().manual_seed(0)  # the peer draws its prompts from the same generator
    for step in range(a.steps):
        ids = [torch.randint(2, vocab, (a.prompt,), generator=g) for _ in range(a.batch)]
        prompts = [" ".join(f"t{i}" for i in q.tolist()) for q in ids]
        sync()
        t = time.perf_counter()
        batch = ppo.rollout(state, prompts)
        sync()
        rollout_s = time.perf_counter() - t
        if not torch.equal(batch.prompt_ids.cpu(), torch.stack(ids)):
            raise RuntimeError("the tokenizer did not map the prompt words back to their ids (expected exactly "
                               f"--prompt {a.prompt} tokens per prompt, got {tuple(batch.prompt_ids.shape)})")
        scores = ppo.score(state, batch, reward_fn)
        stats = ppo.update(state, batch, scores)
        sync()
        total = time.perf_counter() - t
        if stats["response/length"] != a.new:
            raise RuntimeError(f"responses averaged {stats['response/length']} tokens, not exactly --new {a.new}: "
                               "the protocol needs min = max new tokens")
        # log-probs: ppo reports them since issue 12; without the stat, the rest of the rollout after sampling
        logprobs = stats.get("time/logprobs", rollout_s - stats["time/generate"])
        rec = {"step": step, "generate": stats["time/generate"], "logprobs": logprobs,
               "score": stats["time/score"], "train": stats["time/train"], "total": total}
        rec["other"] = total - sum(rec[p] for p in PHASES[:-1])
        print("STEP " + json.dumps(rec), flush=True)
    hwm = vm_hwm_mib()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
    result = {"impl": "ours", "load_s": load_s, "peak_rss_mib": rss, "peak_rss_hwm_mib": hwm,
              "peak_gpu_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
              "peak_gpu_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
              "gradient_checkpointing": bool(a.checkpointing), "fourbit": fourbit}
    print("RESULT " + json.dumps(result), flush=True)


def vm_hwm_mib() -> float | None:
    """This process's own peak RSS since its ``exec`` (``VmHWM``), or None where /proc is missing.

    ``getrusage``'s ``ru_maxrss`` (what both sides report) is at least the RSS of the process that launched it:
    Linux carries the maximum across fork and exec. So the launcher stays small (it never imports torch) and
    this second reading, which starts afresh at exec, shows whether a launcher inflated the first.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10
    except OSError:
        pass
    return None


# ============================================================================ 3. running and alternating
def side_command(side: str, a, folder: Path) -> list[str]:
    """The command line of one run of ``side`` ("ours", "peer-seed" or "peer-best")."""
    common = ["--steps", str(a.steps), "--new", str(a.new), "--prompt", str(a.prompt), "--batch", str(a.batch),
              "--threads", str(a.threads), "--fourbit", str(int(a.fourbit))]
    if side == "ours":
        return [sys.executable, "-m", "sawyer.bench", "worker", "--model", str(folder),
                "--checkpointing", str(int(a.checkpointing)), *common]
    return [str(a.peer_python), str(a.peer_script), "--model", str(folder), "--mode", side.split("-", 1)[1], *common]


def spawn(cmd: list[str], a, what: str, expect: dict[str, int]) -> dict[str, list[dict]]:
    """Run ``cmd`` as a fresh process with the protocol's environment; its ``KEY {json}`` lines by key.

    ``expect`` gives how many lines of each key must come; anything else (a crash, a missing line) is an
    error that names ``what`` failed, the command and the end of its output.
    """
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=a.timeout)
    found = {key: [json.loads(x[len(key) + 1:]) for x in proc.stdout.splitlines() if x.startswith(key + " ")]
             for key in expect}
    if proc.returncode != 0 or any(len(found[k]) != n for k, n in expect.items()):
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        got = ", ".join(f"{len(found[k])}/{n} {k} lines" for k, n in expect.items())
        raise RuntimeError(f"bench {what} failed (exit {proc.returncode}, {got}): {' '.join(cmd)}\n{tail}")
    return found


def run_side(side: str, a, folder: Path) -> dict:
    """One fresh process of ``side``; returns its kept steps, its RESULT and the load average after it."""
    found = spawn(side_command(side, a, folder), a, f"side {side!r}", {"STEP": a.steps, "RESULT": 1})
    steps, results = found["STEP"], found["RESULT"]
    for s in steps:  # the peer has no score phase (its scores are computed outside the step)
        s.setdefault("score", 0.0)
    return {"side": side, "steps": steps[1:], "result": results[0], "load_after": os.getloadavg()[0]}


def check_peer(a) -> None:
    """A clear error when the classic-TRL venv or harness is missing, saying how to make them."""
    if not Path(a.peer_script).exists():
        raise FileNotFoundError(f"peer harness not found: {a.peer_script} (pass --peer-script; it lives in "
                                "shared/bench/ beside the repository)")
    if not Path(a.peer_python).exists():
        raise FileNotFoundError(f"classic-TRL python not found: {a.peer_python}. Make its venv as BENCHMARKS.md "
                                "says (python3 -m venv .venv-trl011; pip install torch==2.13.0, then trl==0.11.4 "
                                "and its pins), or pass --peer-python")


def peer_versions(a) -> dict:
    code = ("import json, torch, trl, transformers, peft; print(json.dumps({'torch': torch.__version__, "
            "'trl': trl.__version__, 'transformers': transformers.__version__, 'peft': peft.__version__}))")
    out = subprocess.run([str(a.peer_python), "-c", code], capture_output=True, text=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-300:]}


# ============================================================================ 4. summary
def spread(values: list[float]) -> dict:
    """Median, min and max of ``values`` (the kept steps of every round of one side)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarise(runs: list[dict]) -> dict:
    """Per side: each phase's and the step's spread over all kept steps, peak memory; ratios ours / peer.

    Ratios are of medians (``ours / peer``: below 1 = ours is faster; ``speedup`` = peer / ours), with the
    min/max of the same ratio taken round by round (each round's median step of ours over the peer's).
    """
    sides: dict[str, dict] = {}
    for side in dict.fromkeys(r["side"] for r in runs):
        mine = [r for r in runs if r["side"] == side]
        steps = [s for r in mine for s in r["steps"]]
        sides[side] = {p: spread([s[p] for s in steps]) for p in (*PHASES, "total")}
        sides[side]["peak_rss_mib"] = max(r["result"]["peak_rss_mib"] for r in mine)
        gpu = [r["result"].get("peak_gpu_gib") for r in mine if r["result"].get("peak_gpu_gib") is not None]
        sides[side]["peak_gpu_gib"] = max(gpu) if gpu else None
    ratios = {}
    if "ours" in sides:
        rounds = {}
        for r in runs:
            rounds.setdefault(r["round"], {})[r["side"]] = statistics.median(s["total"] for s in r["steps"])
        for peer in (s for s in sides if s != "ours"):
            per_round = [v["ours"] / v[peer] for v in rounds.values() if "ours" in v and peer in v]
            ratio = sides["ours"]["total"]["median"] / sides[peer]["total"]["median"]
            ratios[f"ours/{peer}"] = {"ratio": ratio, "speedup": 1 / ratio, "round_min": min(per_round),
                                      "round_max": max(per_round)}
    loads = [r["load_after"] for r in runs]
    return {"sides": sides, "ratios": ratios, "load_average": {"min": min(loads), "median": statistics.median(loads),
                                                                "max": max(loads)}}


def markdown(report: dict) -> str:
    """The report as the Markdown that BENCHMARKS.md takes (seconds per step; median [min-max])."""
    s, cfg = report["summary"], report["config"]
    cell = lambda d: f"{d['median']:.2f} [{d['min']:.2f}-{d['max']:.2f}]"  # noqa: E731
    gpu = any(v["peak_gpu_gib"] is not None for v in s["sides"].values())
    lines = [f"Shape: hidden {cfg['hidden']}, {cfg['layers']} layers, {cfg['heads']} heads, intermediate "
             f"{cfg['inter']}, vocab {cfg['vocab']} ({cfg['params_m']:.3g}M parameters); batch {cfg['batch']}, "
             f"{cfg['prompt']}-token prompts, {cfg['new']} new tokens; {cfg['rounds']} rounds x {cfg['steps']} steps "
             f"(first discarded); {cfg['threads']} threads; gradient checkpointing "
             f"{'on' if cfg['checkpointing'] else 'off'}; device {cfg['device']}.", "",
             "| side | step s | generate | log-probs | score | train | other | peak RSS MiB |"
             + (" peak GPU GiB |" if gpu else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if gpu else "")]
    for side, v in s["sides"].items():
        row = [side, cell(v["total"]), *(cell(v[p]) for p in PHASES), f"{v['peak_rss_mib']:.0f}"]
        if gpu:
            row.append("-" if v["peak_gpu_gib"] is None else f"{v['peak_gpu_gib']:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for name, r in s["ratios"].items():
        lines.append(f"- {name}: {r['ratio']:.3f} of the time ({r['speedup']:.2f}x faster); per round "
                     f"{r['round_min']:.3f}-{r['round_max']:.3f}")
    if report.get("launcher_rss_mib") is not None:
        lines.append(f"- peak RSS includes the launcher's {report['launcher_rss_mib']:.0f} MiB at most (Linux carries "
                     "ru_maxrss across fork/exec)")
    la = s["load_average"]
    lines.append(f"- load average (1 min) after each run: {la['min']:.2f}-{la['max']:.2f}, median {la['median']:.2f}")
    if report.get("floors"):
        f = report["floors"]
        probes = report.get("probes", [])
        readings = (" (the faster of two probes, before and after the runs: "
                    + " and ".join(f"{p['matmul_gflops']:.1f} GFLOP/s, {p['bandwidth_gbs']:.1f} GB/s" for p in probes)
                    + ")") if len(probes) > 1 else ""
        lines += ["", f"Probe: matmul {f['matmul_gflops']:.1f} GFLOP/s at the MLP shape, copy bandwidth "
                  f"{f['bandwidth_gbs']:.1f} GB/s{readings}.", "",
                  "| phase (ours) | measured s | floor s | measured / floor |", "|---|---|---|---|"]
        ours = s["sides"].get("ours")
        for p in ("generate", "logprobs", "train"):
            m = ours[p]["median"] if ours else float("nan")
            lines.append(f"| {p} | {m:.2f} | {f[p + '_s']:.2f} | {m / f[p + '_s']:.1f} |")
    return "\n".join(lines) + "\n"


# ============================================================================ 5. floors
def shape_counts(cfg: dict) -> dict:
    """Parameter counts from a Llama ``config.json``: matmul weights of the blocks, the LM head, the embedding."""
    h, i, v, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    attn = h * cfg["num_attention_heads"] * head_dim * 2 + h * kv * head_dim * 2       # q, o + k, v
    blocks = n * (attn + 3 * h * i)                                                   # + gate, up, down
    norms = (2 * n + 1) * h
    head = 0 if cfg.get("tie_word_embeddings") else v * h
    return {"blocks": blocks, "lm_head": v * h, "embedding": v * h, "total": blocks + head + v * h + norms}


def floors(cfg: dict, a, matmul_gflops: float, bandwidth_gbs: float) -> dict:
    """Lower bounds per phase of our step, in seconds, from FLOPs and bytes (shape comments: B, P, T).

    - forward FLOPs of B sequences: 2 x block weights x B(P+T) tokens + attention 4 x layers x hidden x
      B(P+T)^2 + 2 x lm_head x B(T+1) (we project only the positions that predict the response).
    - generate: the prefill forward, then T decode steps, each bounded by reading every block and LM-head
      weight once (bytes / bandwidth) or by its FLOPs, whichever is slower.
    - log-probs: two forwards (policy, reference). train: ppo_epochs x (forward + backward); with frozen base
      weights the backward computes input gradients only (~1 forward; LoRA's own gradients are tiny),
      plus one more block forward when gradient checkpointing recomputes activations. Without checkpointing
      the first training forward is the rollout's policy pass (``sawyer.ppo`` keeps its graph), so train is
      one forward less.
    """
    c = shape_counts(cfg)
    B, P, T, L, H = a.batch, a.prompt, a.new, cfg["num_hidden_layers"], cfg["hidden_size"]
    rate, bw = matmul_gflops * 1e9, bandwidth_gbs * 1e9
    S = P + T
    blocks_fwd = 2 * c["blocks"] * B * S + 4 * L * H * B * S * S
    fwd = blocks_fwd + 2 * c["lm_head"] * B * (T + 1)
    weight_bytes = (c["blocks"] + c["lm_head"]) * (NF4_BYTES if a.fourbit and a.device == "cuda" else
                                                   2 if a.device == "cuda" else 4)
    decode_flops = 2 * (c["blocks"] + c["lm_head"]) * B
    decode = max(weight_bytes / bw, decode_flops / rate)
    prefill = (2 * c["blocks"] * B * P + 4 * L * H * B * P * P + 2 * c["lm_head"] * B) / rate
    epochs = 2  # the protocol's ppo_epochs
    train = (epochs * (2 * fwd + blocks_fwd) if a.checkpointing else epochs * 2 * fwd - fwd) / rate
    return {"generate_s": prefill + T * decode, "decode_step_s": decode, "weight_bytes": weight_bytes,
            "logprobs_s": 2 * fwd / rate, "train_s": train, "forward_gflop": fwd / 1e9,
            "matmul_gflops": matmul_gflops, "bandwidth_gbs": bandwidth_gbs}


def probe(cfg: dict, a) -> tuple[float, float]:
    """Measured matmul rate (GFLOP/s) at the model's MLP shape (B(P+T) x hidden @ hidden x inter) and copy
    bandwidth (GB/s: bytes read + written), with ``a.threads`` threads."""
    import torch

    torch.set_num_threads(a.threads)
    dev = "cuda" if a.device == "cuda" else "cpu"
    dtype = torch.float32 if dev == "cpu" else torch.bfloat16
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    m, k, n = a.batch * (a.prompt + a.new), cfg["hidden_size"], cfg["intermediate_size"]
    x, w = torch.randn(m, k, device=dev, dtype=dtype), torch.randn(k, n, device=dev, dtype=dtype)
    src = torch.randn(64 * 2**20 if dev == "cpu" else 512 * 2**20, device=dev)  # 256 MiB / 2 GiB fp32
    dst = torch.empty_like(src)

    def best(fn, reps: int = 7) -> float:
        """Seconds per call: the fastest of ``reps`` timings, each of enough calls to last >= 50 ms. The
        fastest, not the median: a floor takes the rate the machine reaches, not what load left of it."""
        calls, t = 1, 0.0
        while t < 0.05 and calls < 2**16:
            calls *= 2
            sync()
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            t = time.perf_counter() - t
        times = []
        for _ in range(reps):
            sync()
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            times.append((time.perf_counter() - t) / calls)
        return min(times)

    mm = best(lambda: x @ w)
    cp = best(lambda: dst.copy_(src))
    return 2 * m * k * n / mm / 1e9, 2 * src.numel() * src.element_size() / cp / 1e9


def prepare(a) -> dict:
    """Build or reuse the model folder, probe the machine, collect versions (the ``probe`` command's work).

    It runs in a child process of its own, so the launcher of the timed runs never holds torch or the probe's
    buffers (see ``vm_hwm_mib`` for why the launcher's size would leak into the children's peak RSS).
    """
    import peft
    import torch
    import transformers

    torch.set_num_threads(a.threads)
    a.device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = model_folder(a)
    cfg = json.loads((folder / "config.json").read_text())
    gflops, gbs = probe(cfg, a)
    return {"config": {"hidden": cfg["hidden_size"], "layers": cfg["num_hidden_layers"],
                       "heads": cfg["num_attention_heads"], "inter": cfg["intermediate_size"],
                       "vocab": cfg["vocab_size"], "params_m": shape_counts(cfg)["total"] / 1e6,
                       "model": str(folder), "batch": a.batch, "prompt": a.prompt, "new": a.new,
                       "steps": a.steps, "rounds": a.rounds, "threads": a.threads,
                       "checkpointing": bool(a.checkpointing), "fourbit": bool(a.fourbit), "device": a.device},
            "floors": floors(cfg, a, gflops, gbs),
            "versions": {"ours": {"torch": torch.__version__, "transformers": transformers.__version__,
                                  "peft": peft.__version__}}}


# ============================================================================ 6. command line
def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m sawyer.bench", description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=("ours", "compare", "probe", "worker"),
                    help="ours: our side only; compare: ours vs classic TRL (needs .venv-trl011); probe: floors "
                         "inputs only; worker: one run of our side in this process (used by the others)")
    for k, v in dict(hidden=512, layers=4, heads=8, kv=0, inter=1408, vocab=32000).items():
        ap.add_argument(f"--{k}", type=int, default=v, help="model shape (kv 0: = heads)")
    ap.add_argument("--model", help="an existing Llama folder instead of building one from the shape")
    ap.add_argument("--models", default=str(ROOT / "runs" / "bench"), help="where built model folders are kept")
    for k, v in dict(batch=8, prompt=64, new=64, steps=3, rounds=3, threads=2, checkpointing=0, fourbit=1,
                     timeout=3600).items():
        ap.add_argument(f"--{k}", type=int, default=v)
    ap.add_argument("--peer-python", default=str(PEER_PYTHON), help="python of the classic-TRL venv")
    ap.add_argument("--peer-script", default=str(PEER_SCRIPT), help="the harness peer_trl011.py")
    ap.add_argument("--out", help="folder for bench.json and bench.md (default: print only)")
    a = ap.parse_args(argv)
    if a.steps < 2 or a.rounds < 1:
        ap.error("--steps must be >= 2 (the first is discarded) and --rounds >= 1")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    if a.command == "worker":
        worker(a)
        return 0
    if a.command == "probe":
        report = prepare(a)
        print(json.dumps(report["floors"], indent=1), file=sys.stderr)
        print("PREPARE " + json.dumps(report), flush=True)
        return 0
    # ours / compare: this launcher stays small (no torch); every piece of work is a child process
    sides = ("ours",) if a.command == "ours" else SIDES
    if a.command == "compare":
        check_peer(a)
    cmd = [sys.executable, "-m", "sawyer.bench", "probe", *(argv if argv is not None else sys.argv[1:])[1:]]
    report = spawn(cmd, a, "preparation (model folder, probe)", {"PREPARE": 1})["PREPARE"][0]
    folder, a.device = Path(report["config"]["model"]), report["config"]["device"]
    if a.command == "compare":
        report["versions"]["peer"] = peer_versions(a)
    report["launcher_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    runs = []
    for r in range(a.rounds):
        for side in sides:
            run = run_side(side, a, folder)
            run["round"] = r
            runs.append(run)
            print(f"round {r + 1}/{a.rounds} {side}: {statistics.median(s['total'] for s in run['steps']):.2f} s "
                  f"per step, load {run['load_after']:.2f}", file=sys.stderr, flush=True)
    # a second probe after the runs: the floors take the faster reading of the two (a probe that lands in a slow
    # moment of the machine would otherwise set floors above what the runs themselves reached)
    again = spawn(cmd, a, "second probe (after the runs)", {"PREPARE": 1})["PREPARE"][0]["floors"]
    report["probes"] = [{k: f[k] for k in ("matmul_gflops", "bandwidth_gbs")} for f in (report["floors"], again)]
    cfg = json.loads((folder / "config.json").read_text())
    report["floors"] = floors(cfg, a, max(p["matmul_gflops"] for p in report["probes"]),
                              max(p["bandwidth_gbs"] for p in report["probes"]))
    report["runs"], report["summary"] = runs, summarise(runs)
    report["markdown"] = markdown(report)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "bench.json").write_text(json.dumps(report, indent=1))
        (Path(a.out) / "bench.md").write_text(report["markdown"])
    print(report["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
