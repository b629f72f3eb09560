"""Every notebook, executed end to end on the tiny preset through the same runner as `make workshop`.

One session-scoped run of the whole course (01-05 into one run folder); the tests then check what each
notebook computed and wrote. A second run of notebook 04 on a copy of the run folder checks that the reward
curves reproduce from the seed.
"""
import json
import shutil

import pytest

from sawyer import plots, workshop

# The session fixture executes the whole course (01-06, ~13 min on 2 quiet cores) inside the first test's set-up,
# which pytest-timeout counts against that test: give this module room above the suite-wide 900 s.
pytestmark = pytest.mark.timeout(2700)


@pytest.fixture(scope="session")
def course_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("workshop") / "run"
    lines = []
    workshop.run("tiny", run_dir=str(run_dir), echo=lines.append)
    return run_dir, lines


def metrics(run_dir, stage):
    return json.loads((run_dir / stage / "metrics.json").read_text())


def test_runner_prints_one_line_per_notebook_and_writes_the_report(course_run):
    run_dir, lines = course_run
    for num, stem, stage, _ in workshop.COURSE:
        assert any(stem in line and "running" in line for line in lines), lines
        assert (run_dir / stage / "DONE").exists()
        assert (run_dir / "notebooks" / f"{stem}.ipynb").exists()
    report = (run_dir / "report.md").read_text()
    for stem in ("01_flan_t5_neutral_summaries", "05_sawyer_evaluation"):
        assert f"## {stem}" in report
    assert "accuracy_after" in report and "ppo_vs_sft_wilcoxon_p" in report and ".png)" in report
    timings = json.loads((run_dir / "timings.json").read_text())
    assert set(timings) == {stem for _, stem, _, _ in workshop.COURSE}


def test_executed_notebooks_carry_their_figures_once_and_no_noise(course_run):
    """Each figure call leaves exactly one image in its cell (no inline-backend duplicate, no stale copies of a
    live plot, none lost to a non-inline backend); no FutureWarning, kernel/TCP line, widget bar or raw ANSI."""
    from sawyer.notebooks import output_problems

    run_dir, _ = course_run
    problems, images = [], 0
    for _, stem, _, _ in workshop.COURSE:
        executed = run_dir / "notebooks" / f"{stem}.ipynb"
        problems += output_problems(executed)
        images += executed.read_text().count('"image/png"')
    assert problems == []
    assert images >= 15  # the course draws at least 15 figures on tiny


def test_01_reward_rises_and_before_after_is_computed(course_run):
    run_dir, _ = course_run
    m = metrics(run_dir, "01_summaries")
    assert m["train_score_last"] > m["train_score_first"], m
    for key in ("cola_mean_before", "cola_mean_after", "neutral_mean_before", "neutral_mean_after",
                "cola_wilcoxon_p"):
        assert isinstance(m[key], float)
    log = plots.read_jsonl(run_dir / "01_summaries" / "ppo_log.jsonl")
    assert len(log) == m["steps"]
    assert (run_dir / "01_summaries" / "reward_boxplot.png").exists()


def test_02_sft_loss_falls_stops_and_saves_a_small_adapter(course_run):
    run_dir, _ = course_run
    m = metrics(run_dir, "02_sft")
    assert m["eval_loss_after"] < m["eval_loss_before"]
    assert m["stop_rate_after"] > 0.5, "SFT model should end its replies with ###STOP###"
    # only the three marker rows of each embedding matrix are saved, never the whole (resized) matrices
    from safetensors import safe_open

    with safe_open(str(run_dir / "02_sft" / "adapter" / "adapter_model.safetensors"), "pt") as f:
        rows = {k: f.get_slice(k).get_shape() for k in f.keys() if "lora_" not in k}
    assert len(rows) == 2 and all(shape[0] == 3 for shape in rows.values()), rows
    assert (run_dir / "02_sft" / "adapter" / "adapter_model.safetensors").stat().st_size < m["embedding_matrices_bytes"]


def test_03_reward_model_beats_075_on_held_out_pairs(course_run):
    run_dir, _ = course_run
    m = metrics(run_dir, "03_reward_model")
    assert m["accuracy_after"] >= 0.75, m
    assert m["accuracy_after"] > m["accuracy_before"]
    assert (run_dir / "03_reward_model" / "model" / "model.safetensors").exists()


def test_04_ppo_logs_every_step_and_checkpoints(course_run):
    run_dir, _ = course_run
    m = metrics(run_dir, "04_ppo")
    log = plots.read_jsonl(run_dir / "04_ppo" / "ppo_log.jsonl")
    assert [r["step"] for r in log] == list(range(1, m["steps"] + 1))
    for name in ("objective/score", "objective/kl", "policy/clipfrac", "val/explained_variance", "time/generate"):
        assert name in log[0]
    assert (run_dir / "04_ppo" / "checkpoint" / "trainer_state.json").exists()
    assert (run_dir / "04_ppo" / "adapter" / "adapter_config.json").exists()


def test_05_evaluation_numbers_come_from_the_run(course_run):
    run_dir, _ = course_run
    m = metrics(run_dir, "05_evaluation")
    rows = plots.read_jsonl(run_dir / "05_evaluation" / "eval_rewards.jsonl")
    assert len(rows) == 3 * m["n_prompts"]
    ppo_rewards = [r["reward"] for r in rows if r["model"] == "ppo"]
    assert abs(sum(ppo_rewards) / len(ppo_rewards) - m["reward_mean_ppo"]) < 1e-6
    bench = json.loads((run_dir / "05_evaluation" / "benchmarks.json").read_text())
    assert {"truthful_qa mc1 | sft | loglik", "mmlu world_religions | ppo | letter"} <= set(bench)
    assert all(0 <= b["ci_low"] <= b["accuracy"] <= b["ci_high"] <= 1 for b in bench.values())
    assert "Reward." in m["summary"]
    assert (run_dir / "figures").is_dir() and any((run_dir / "figures").glob("*.png"))


def test_06_compares_ppo_dpo_grpo_on_05s_prompts_with_costs_and_round_trips(course_run):
    from safetensors import safe_open

    from sawyer.presets import get_preset

    run_dir, _ = course_run
    m, m05, tiny = metrics(run_dir, "06_preference"), metrics(run_dir, "05_evaluation"), get_preset("tiny")
    rows = plots.read_jsonl(run_dir / "06_preference" / "eval_rewards.jsonl")
    assert len(rows) == 4 * m["n_prompts"] and m["n_prompts"] == m05["n_prompts"]
    for name in ("sft", "ppo", "dpo", "grpo"):
        values = [r["reward"] for r in rows if r["model"] == name]
        assert abs(sum(values) / len(values) - m[f"reward_mean_{name}"]) < 1e-6
    for name in ("sft", "ppo"):  # evaluated exactly as notebook 05 evaluates them
        assert m[f"reward_mean_{name}"] == pytest.approx(m05[f"reward_mean_{name}"], abs=1e-5)
    for label in ("ppo_vs_sft", "dpo_vs_sft", "grpo_vs_sft", "dpo_vs_ppo", "grpo_vs_ppo"):
        t = m["tests"][label]
        assert t["ci"][0] <= t["mean_diff"] <= t["ci"][1] and 0 <= t["wilcoxon_p"] <= 1, (label, t)
    cost = m["cost"]
    assert cost["dpo"]["samples_generated"] == 0 and cost["dpo"]["pairs_trained"] == tiny.dpo.steps * tiny.dpo.batch_size
    assert cost["grpo"]["samples_generated"] == tiny.grpo.steps * tiny.grpo.group_size * tiny.grpo.prompts_per_step
    assert cost["ppo"]["samples_generated"] == tiny.ppo.steps * tiny.ppo.ppo.batch_size
    assert all(cost[k]["wall_s"] > 0 for k in ("ppo", "dpo", "grpo"))
    assert cost["dpo"]["peak_memory_gib"] > 0 and cost["grpo"]["peak_memory_gib"] > 0
    assert m["dpo"]["first_loss"] == pytest.approx(0.6931, abs=1e-3), "DPO starts at its reference, the SFT model"
    for method in ("dpo", "grpo"):
        assert m[method]["marker_rows_intact"] and m[method]["round_trip_max_abs_logit_diff"] < 1e-4, m[method]
        with safe_open(str(run_dir / "06_preference" / f"{method}_adapter" / "adapter_model.safetensors"), "pt") as f:
            rows = {k: f.get_slice(k).get_shape() for k in f.keys() if "lora_" not in k}
        assert len(rows) == 2 and all(shape[0] == 3 for shape in rows.values()), rows
    report = (run_dir / "report.md").read_text()
    assert "## 06_ppo_vs_dpo_vs_grpo" in report and "**three way**" in report and "| GRPO |" in report


def test_resume_skips_finished_notebooks(course_run):
    run_dir, _ = course_run
    lines = []
    workshop.run("tiny", run_dir=str(run_dir), resume=True, echo=lines.append)
    assert sum("skipped" in line for line in lines) == len(workshop.COURSE)


def test_ppo_reward_curves_reproduce_from_the_seed(course_run, tmp_path):
    run_dir, _ = course_run
    copy = tmp_path / "again"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("04_ppo", "05_evaluation"))
    workshop.run("tiny", run_dir=str(copy), only=["04"], echo=lambda *a, **k: None)

    def curves(folder):
        return [{k: v for k, v in row.items() if not k.startswith("time/")}
                for row in plots.read_jsonl(folder / "04_ppo" / "ppo_log.jsonl")]

    first, second = curves(run_dir), curves(copy)
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], key)


def test_a_killed_rerun_of_02_is_not_done_resumes_and_04_does_not_resume_across_it(course_run, tmp_path):
    """issue 17: SIGKILL a re-run of 02 after its first checkpoint -> no DONE, report says incomplete;
    ``--resume`` re-runs 02 from that checkpoint to the same adapter; then 04 (resume=True, with a finished
    checkpoint of the old 02 in its folder) must start fresh and say that 02 changed."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    run_dir, _ = course_run
    copy = tmp_path / "rerun"
    # the old 02's Trainer checkpoints stay behind, so the checkpoint awaited below is the re-run's
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("01_summaries", "05_evaluation", "trainer"))
    runner = subprocess.Popen([sys.executable, "-m", "sawyer.workshop", "--preset", "tiny", "--only", "02",
                               "--run-dir", str(copy)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while not list((copy / "02_sft" / "trainer").glob("checkpoint-*/trainer_state.json")):
            assert runner.poll() is None and time.time() < deadline, "02 ended before its first checkpoint"
            time.sleep(0.5)
        kernel = int(re.match(r"pid (\d+)", (copy / "02_sft" / ".lock").read_text()).group(1))
        os.kill(kernel, signal.SIGKILL)  # the notebook's kernel dies mid-training, as on a Colab disconnect
        assert runner.wait(timeout=120) != 0
    finally:
        runner.kill()
    assert not (copy / "02_sft" / "DONE").exists()
    assert "| 02_sawyer_sft | incomplete |" in (copy / "report.md").read_text()

    lines = []
    workshop.run("tiny", run_dir=str(copy), only=["02", "04"], resume=True, echo=lines.append)
    assert not any("skipped" in line for line in lines), lines  # 02 is not DONE, so --resume re-runs it
    assert any("04_sawyer_ppo: finished, but built from an older 02_sft: running it again" in line for line in lines)
    nb02 = printed(copy / "notebooks" / "02_sawyer_sft.ipynb")
    assert "its checkpoint, if any, is resumed" in nb02
    for name, tensor in load_file(run_dir / "02_sft" / "adapter" / "adapter_model.safetensors").items():
        again = load_file(copy / "02_sft" / "adapter" / "adapter_model.safetensors")[name]
        assert torch_close(again, tensor), name
    nb04 = printed(copy / "notebooks" / "04_sawyer_ppo.ipynb")
    assert "04_ppo: starting fresh" in nb04 and "upstream stage 02_sft was re-run" in nb04
    assert "starting from step 0" in nb04 and "resumed at step" not in nb04
    steps = [row["step"] for row in plots.read_jsonl(copy / "04_ppo" / "ppo_log.jsonl")]
    assert steps == list(range(1, metrics(copy, "04_ppo")["steps"] + 1))
    assert metrics(copy, "02_sft")["wall_seconds"] > 0 and "peak_cpu_rss_gib" in metrics(copy, "04_ppo")


def printed(notebook) -> str:
    """Everything an executed notebook's cells printed (outputs only, not the source)."""
    cells = json.loads(notebook.read_text())["cells"]
    return "".join("".join(o.get("text", "")) for c in cells for o in c.get("outputs", []))


def torch_close(a, b) -> bool:
    import torch

    return torch.allclose(a, b, rtol=1e-5, atol=1e-6)
