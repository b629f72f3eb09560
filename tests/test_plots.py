"""Tests for sawyer.plots: figures have the expected axes and artists, files land on disk, runs redraw."""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.container import ErrorbarContainer  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from sawyer import plots  # noqa: E402

@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _ppo_records(n=12, every_kl=1):
    rows = []
    for step in range(n):
        row = {"step": step, "objective/score": 0.1 * step, "loss/value": 1.0 / (step + 1), "beta": 0.2}
        if step % every_kl == 0:
            row["objective/kl"] = 0.05 * step
        rows.append(row)
    return rows


def test_training_curves_one_panel_per_key_and_saved(tmp_path):
    path = tmp_path / "sub" / "curves.png"
    fig = plots.training_curves(_ppo_records(every_kl=3), path=path)
    assert len(fig.axes) == 2 and [ax.get_title() for ax in fig.axes] == ["objective/score", "objective/kl"]
    assert all(len(ax.lines) == 2 for ax in fig.axes)  # raw + smoothed
    assert len(fig.axes[1].lines[0].get_xdata()) == 4  # kl logged every 3rd step: 0, 3, 6, 9
    assert path.is_file() and path.stat().st_size > 0
    every = plots.training_curves(_ppo_records(), keys=None)
    assert [ax.get_title() for ax in every.axes] == ["objective/score", "loss/value", "beta", "objective/kl"]
    with pytest.raises(ValueError, match="policy/clipfrac"):
        plots.training_curves(_ppo_records(), keys=("policy/clipfrac",))


def test_training_curves_smoothing_is_an_ema():
    fig = plots.training_curves([{"step": i, "x": v} for i, v in enumerate([0.0, 1.0, 1.0])], keys=("x",),
                                smooth=0.5)
    np.testing.assert_allclose(fig.axes[0].lines[1].get_ydata(), [0.0, 0.5, 0.75])


def test_reward_boxplot_and_histograms(tmp_path):
    groups = {"SFT": [1.0, 2.0, 3.0, 10.0], "RL": [2.0, 3.0, 3.5, 4.0, 5.0]}
    fig = plots.reward_boxplot(groups, path=tmp_path / "box.png")
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["SFT", "RL"]
    np.testing.assert_allclose(ax.collections[0].get_offsets()[:, 1], [4.0, 3.5])  # the means
    assert (tmp_path / "box.png").is_file()
    fig = plots.reward_histograms(groups, bins=5)
    (ax,) = fig.axes
    assert len(ax.patches) == 2 * 5 and len(ax.lines) == 2  # shared bins, one mean line per group
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["SFT (mean 4.00)", "RL (mean 3.50)"]


def test_margin_histogram_and_length_scatter():
    fig = plots.margin_histogram([-1.0, 0.5, 2.0, 3.0], bins=4)
    assert fig.axes[0].get_title() == "Pairwise accuracy 0.750 on 4 pairs"
    x, y = [10, 20, 30, 40, 50], [1.0, 2.5, 2.0, 4.0, 5.5]
    fig = plots.length_scatter(x, y, label="RL")
    (ax,) = fig.axes
    r = np.corrcoef(x, y)[0, 1]
    assert ax.get_title() == f"RL: Pearson r = {r:.2f}" and len(ax.collections) == 1 and len(ax.lines) == 1
    assert ax.get_xlabel() == "response length (words)"
    slope, intercept = np.polyfit(x, y, 1)
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [slope * 10 + intercept, slope * 50 + intercept])


def test_length_scatter_marks_truncated_answers_and_fits_without_them():
    x, y = [10, 20, 30, 40, 200], [1.0, 2.5, 2.0, 4.0, -3.0]  # the long answer was scored cut off
    fig = plots.length_scatter(x, y, label="held out", unit="tokens", truncated=[0, 0, 0, 0, 1])
    (ax,) = fig.axes
    assert len(ax.collections) == 2 and ax.collections[1].get_offsets().tolist() == [[200.0, -3.0]]
    r = np.corrcoef(x[:4], y[:4])[0, 1]
    assert ax.get_title() == f"held out: Pearson r = {r:.2f}" and ax.get_xlabel() == "response length (tokens)"
    slope, intercept = np.polyfit(x[:4], y[:4], 1)
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [slope * 10 + intercept, slope * 40 + intercept])
    assert "truncated (1, not in fit)" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_plots_close_their_figure_so_it_shows_once():
    """The inline backend draws every *open* figure at the end of a cell, on top of display(fig): closed
    figures show only where they are displayed, and a live loop's redraws leave no stale copies."""
    for _ in range(3):  # like a live plot redrawn in a training loop
        fig = plots.training_curves(_ppo_records(), keys=("objective/score",))
    assert plt.get_fignums() == []
    from IPython.core.pylabtools import print_figure  # what the inline backend's display(fig) calls

    assert print_figure(fig, "png")[:4] == b"\x89PNG"  # a closed figure still renders for display()


def test_spotcheck_accuracy_and_word_shift_bars():
    fig = plots.spotcheck_bar(["short", "x" * 100, "line\nbreak"], [1.5, -0.5, 3.0], width=20)
    ax = fig.axes[0]
    assert len(ax.patches) == 3
    assert [t.get_text() for t in ax.get_yticklabels()] == ["short", "x" * 17 + "...", "line break"]
    results = {"truthful_qa SFT": {"accuracy": 0.33, "ci_low": 0.30, "ci_high": 0.36},
               "truthful_qa RL": {"accuracy": 0.22, "ci_low": 0.19, "ci_high": 0.25},
               "world_religions SFT": {"accuracy": 0.77, "ci_low": 0.70, "ci_high": 0.83}}
    ax = plots.accuracy_bars(results).axes[0]
    np.testing.assert_allclose([p.get_height() for p in ax.patches], [0.33, 0.22, 0.77])
    (bars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    segments = bars.lines[2][0].get_segments()  # the error bars: drawn from the CI, not typed in
    np.testing.assert_allclose([(s[0][1], s[1][1]) for s in segments], [(0.30, 0.36), (0.19, 0.25), (0.70, 0.83)])
    assert ax.get_legend() is None  # no chance level asked for
    ax = plots.accuracy_bars(results, chance={"truthful_qa SFT": 0.25, "truthful_qa RL": 0.25,
                                              "world_religions SFT": 0.25}).axes[0]
    (chance,) = [c for c in ax.collections if c.get_label() == "chance"]
    np.testing.assert_allclose([seg[:, 1] for seg in chance.get_segments()], [[0.25, 0.25]] * 3)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["chance"]


def test_word_shift_bars_draw_z_cut_off_and_baseline():
    shift = {"table": pd.DataFrame({"word": ["announced", "scrapped", "deal"], "z": [4.0, -3.5, 0.1]}),
             "z_crit": 3.2}
    fig = plots.word_shift_bars(shift, baseline={"max_abs_z": 2.0})
    ax = fig.axes[0]
    bars = [p for p in ax.patches if p.get_height() < 1]  # the barh bars (the band is a tall polygon)
    np.testing.assert_allclose(sorted(b.get_width() for b in bars), [-3.5, 0.1, 4.0])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["announced", "scrapped", "deal"]
    xs = sorted(line.get_xdata()[0] for line in ax.lines)
    assert xs == [-3.2, 0.0, 3.2]
    assert "no-change baseline (|z| <= 2.0)" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_read_jsonl_names_the_bad_line(tmp_path):
    p = tmp_path / "log.jsonl"
    p.write_text('{"step": 0}\n\n{"step": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"log.jsonl, line 4"):
        plots.read_jsonl(p)
    p.write_text('{"step": 0}\n\n{"step": 1}\n')
    assert plots.read_jsonl(p) == [{"step": 0}, {"step": 1}]


def _write_run(run: Path) -> None:
    (run / "04_ppo").mkdir(parents=True)
    (run / "04_ppo" / "ppo_log.jsonl").write_text("\n".join(json.dumps(r) for r in _ppo_records()) + "\n")
    (run / "05_evaluation").mkdir()
    rng = np.random.default_rng(0)
    rows = [{"prompt_id": i, "model": m, "reward": float(rng.normal(mu)), "length": int(rng.integers(5, 60))}
            for m, mu in (("sft", 5.7), ("rl/ppo", 6.9)) for i in range(20)]
    (run / "05_evaluation" / "eval_rewards.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    bench = {"truthful_qa": {"accuracy": 0.3, "ci_low": 0.27, "ci_high": 0.33, "n": 817}}
    (run / "05_evaluation" / "benchmarks.json").write_text(json.dumps(bench))


EXPECTED = ["04_training_curves.png", "05_reward_boxplot.png", "05_reward_histograms.png",
            "05_length_vs_reward_sft.png", "05_length_vs_reward_rl_ppo.png", "05_benchmarks.png"]


def test_redraw_run_draws_what_exists_and_names_what_is_missing(tmp_path, capsys):
    _write_run(tmp_path)
    written = plots.redraw_run(tmp_path)
    assert [p.name for p in written] == EXPECTED
    assert all(p.parent == tmp_path / "figures" and p.stat().st_size > 0 for p in written)
    out = capsys.readouterr().out
    assert "01_summaries/ppo_log.jsonl" in out and "03_reward_model/reward_log.jsonl" in out
    assert "04_ppo" not in out and plt.get_fignums() == []  # figures closed after saving


def test_redraw_run_names_the_bad_record(tmp_path):
    (tmp_path / "05_evaluation").mkdir()
    bad = '{"prompt_id": 0, "model": "sft", "reward": 1}\n'  # no "length"
    (tmp_path / "05_evaluation" / "eval_rewards.jsonl").write_text(bad)
    with pytest.raises(ValueError, match=r"eval_rewards.jsonl, row 1: missing field\(s\) \['length'\]"):
        plots.redraw_run(tmp_path)


def test_cli_redraws_a_run(tmp_path, capsys):
    (tmp_path / "03_reward_model").mkdir()
    rows = [{"step": s, "loss/train": 1 / (s + 1), "val/accuracy": 0.5 + s / 40} for s in range(8)]
    (tmp_path / "03_reward_model" / "reward_log.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert plots.main([str(tmp_path)]) == 0  # what `python -m sawyer.plots RUN_DIR` runs
    assert str(tmp_path / "figures" / "03_reward_training.png") in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "figures").glob("*.png")] == ["03_reward_training.png"]
    with pytest.raises(SystemExit):
        plots.main([str(tmp_path / "nope")])
