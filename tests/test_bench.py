"""Tests of sawyer.bench: the report's structure on a tiny shape, the summary and floor arithmetic.

What runs for real: our PPO step (``sawyer.ppo`` on a tiny random-weight Llama, in its own process, exactly as
``python -m sawyer.bench compare`` runs it) and the whole alternation, parsing and summary path. What does not:
classic TRL 0.11.4. It needs a second virtual environment (``.venv-trl011``: trl 0.11.4 pins transformers
4.46, which cannot live beside our transformers 5), which neither ``make install`` nor CI builds; so here its
harness is replaced by a stand-in script that prints the same ``STEP``/``RESULT`` lines with known numbers,
which also lets the ratios be checked against hand-computed values. The real comparison is the opt-in command
documented in BENCHMARKS.md. No timing is asserted: a shared 2-core machine gives any number.
"""
import json
import math
import sys

import pytest
import torch

from sawyer import bench

TINY = ["--hidden", "32", "--layers", "2", "--heads", "4", "--inter", "64", "--vocab", "128",
        "--batch", "2", "--prompt", "8", "--new", "4", "--steps", "2", "--rounds", "1", "--threads", "1"]

#: A stand-in for shared/bench/peer_trl011.py: same arguments, same output lines, fixed phase times.
FAKE_PEER = """
import argparse, json
ap = argparse.ArgumentParser()
for k in ("model", "mode", "steps", "new", "prompt", "batch", "threads", "fourbit"):
    ap.add_argument("--" + k)
a = ap.parse_args()
scale = {"seed": 4.0, "best": 2.0}[a.mode]
for step in range(int(a.steps)):
    rec = {"step": step, "generate": 0.5 * scale, "logprobs": 0.25 * scale, "train": 0.25 * scale, "other": 0.0}
    rec["total"] = scale
    print("STEP " + json.dumps(rec))
print("RESULT " + json.dumps({"impl": "peer-" + a.mode, "load_s": 0.1, "peak_rss_mib": 100.0 * scale,
                              "peak_gpu_gib": None}))
"""


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One ``compare`` on the tiny shape: ours for real, the peer sides from the stand-in."""
    tmp = tmp_path_factory.mktemp("bench")
    fake = tmp / "fake_peer.py"
    fake.write_text(FAKE_PEER)
    out = tmp / "out"
    assert bench.main(["compare", *TINY, "--models", str(tmp / "models"), "--peer-python", sys.executable,
                       "--peer-script", str(fake), "--out", str(out)]) == 0
    return json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text()


def test_compare_alternates_sides_and_times_every_phase(report):
    rep, _ = report
    assert [r["side"] for r in rep["runs"]] == ["peer-seed", "peer-best", "ours"]   # one round, peer first
    ours = next(r for r in rep["runs"] if r["side"] == "ours")
    assert len(ours["steps"]) == 1 and ours["steps"][0]["step"] == 1               # the first step is discarded
    for s in ours["steps"]:
        for phase in ("generate", "logprobs", "train"):
            assert s[phase] > 0, phase
        assert s["score"] >= 0 and s["other"] >= 0
        assert math.isclose(sum(s[p] for p in bench.PHASES), s["total"], rel_tol=1e-9)
    rss, hwm = ours["result"]["peak_rss_mib"], ours["result"]["peak_rss_hwm_mib"]
    assert 100 < hwm < rss + 1      # torch alone is more; ru_maxrss >= VmHWM (Linux's counters differ by < 1 MiB)
    assert rep["launcher_rss_mib"] > 0 and "launcher" in report[1]
    assert ours["result"]["gradient_checkpointing"] is False  # the default: what the presets do where memory allows
    assert rep["config"]["params_m"] == pytest.approx(bench.shape_counts(json.loads(
        (bench.Path(rep["config"]["model"]) / "config.json").read_text()))["total"] / 1e6)


def test_compare_ratios_and_markdown(report):
    rep, md = report
    s = rep["summary"]
    assert set(s["sides"]) == {"peer-seed", "peer-best", "ours"}
    assert s["sides"]["peer-best"]["total"]["median"] == 2.0 and s["sides"]["peer-seed"]["peak_rss_mib"] == 400
    ours = s["sides"]["ours"]["total"]["median"]
    assert s["ratios"]["ours/peer-best"]["ratio"] == pytest.approx(ours / 2.0)
    assert s["ratios"]["ours/peer-seed"]["speedup"] == pytest.approx(4.0 / ours)
    assert "| side | step s | generate | log-probs | score | train | other | peak RSS MiB |" in md
    assert md.count("\n| ours |") == 1 and "ours/peer-best" in md and "load average" in md
    for key in ("generate_s", "logprobs_s", "train_s", "matmul_gflops", "bandwidth_gbs"):
        assert rep["floors"][key] > 0, key
    probes = rep["probes"]  # one before, one after the runs; the floors use the faster reading of each rate
    assert len(probes) == 2 and rep["floors"]["matmul_gflops"] == max(p["matmul_gflops"] for p in probes)
    assert rep["floors"]["bandwidth_gbs"] == max(p["bandwidth_gbs"] for p in probes)
    assert "the faster of two probes" in md
    assert rep["versions"]["peer"]["torch"] == torch.__version__  # the stand-in ran in our python


def test_word_tokenizer_maps_words_to_their_ids():
    tok = bench.word_tokenizer(32000)
    ids = [2, 16406, 10, 31999, 1000]   # "t16406" once split into "t1" + "6406" when t1 was the EOS token
    assert tok(" ".join(f"t{i}" for i in ids))["input_ids"] == ids
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 1)
    assert tok.decode([0, 12, 1, 345], skip_special_tokens=True) == "t12 t345"


def test_summarise_literal_values():
    def run(side, rnd, totals):
        return {"side": side, "round": rnd, "load_after": 1.0 + rnd, "result": {"peak_rss_mib": 10.0 * (rnd + 1)},
                "steps": [{**{p: t / 5 for p in bench.PHASES}, "total": t} for t in totals]}
    runs = [run("peer-best", 0, [4.0, 6.0]), run("ours", 0, [2.0, 2.0]),
            run("peer-best", 1, [8.0, 8.0]), run("ours", 1, [2.0, 6.0])]
    s = bench.summarise(runs)
    assert s["sides"]["ours"]["total"] == {"median": 2.0, "min": 2.0, "max": 6.0, "n": 4}
    assert s["sides"]["peer-best"]["total"]["median"] == 7.0                      # of 4, 6, 8, 8
    r = s["ratios"]["ours/peer-best"]
    assert r["ratio"] == pytest.approx(2 / 7) and r["speedup"] == pytest.approx(3.5)
    assert (r["round_min"], r["round_max"]) == pytest.approx((2 / 5, 4 / 8))        # per round: 2/5, 4/8
    assert s["sides"]["ours"]["peak_rss_mib"] == 20.0
    assert s["load_average"] == {"min": 1.0, "median": 1.5, "max": 2.0}


def test_shape_counts_match_the_model_and_the_anchor():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=100, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    assert bench.shape_counts(cfg.to_dict())["total"] == sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
    anchor = {"hidden_size": 512, "intermediate_size": 1408, "vocab_size": 32000, "num_hidden_layers": 4,
              "num_attention_heads": 8}
    assert round(bench.shape_counts(anchor)["total"] / 1e6, 1) == 45.6              # the 45.6M


def test_floors_arithmetic():
    cfg = {"hidden_size": 4, "intermediate_size": 8, "vocab_size": 10, "num_hidden_layers": 1,
           "num_attention_heads": 2}
    a = bench.parse(["probe", "--batch", "1", "--prompt", "2", "--new", "3", "--checkpointing", "0"])
    a.device = "cpu"
    f0 = bench.floors(cfg, a, matmul_gflops=1.0, bandwidth_gbs=1.0)
    blocks, head = 4 * 4 * 4 + 3 * 4 * 8, 10 * 4                                  # 160, 40 weights
    blocks_fwd = 2 * blocks * 5 + 4 * 1 * 4 * 25                                  # B(P+T) = 5 tokens
    fwd = blocks_fwd + 2 * head * 4                                               # LM head on T+1 = 4 positions
    assert f0["forward_gflop"] * 1e9 == pytest.approx(fwd)
    assert f0["logprobs_s"] == pytest.approx(2 * fwd / 1e9)
    assert f0["train_s"] == pytest.approx(3 * fwd / 1e9)    # 2 epochs x (fwd + bwd), the first fwd in log-probs
    assert f0["decode_step_s"] == pytest.approx(4 * (blocks + head) / 1e9)         # fp32 weights read once
    a.checkpointing = 1
    f1 = bench.floors(cfg, a, matmul_gflops=1.0, bandwidth_gbs=1.0)
    assert f1["train_s"] == pytest.approx(2 * (2 * fwd + blocks_fwd) / 1e9)        # + one recompute per epoch


def test_compare_without_the_trl_venv_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"classic-TRL python not found: .*nope.*\.venv-trl011"):
        script = tmp_path / "peer.py"  # a harness that exists, so the missing venv is what gets reported
        script.write_text("")
        bench.main(["compare", *TINY, "--peer-python", str(tmp_path / "nope"), "--peer-script", str(script),
                    "--models", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="peer harness not found"):
        bench.main(["compare", *TINY, "--peer-script", str(tmp_path / "none.py"), "--models", str(tmp_path)])
