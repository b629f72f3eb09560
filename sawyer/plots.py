"""The course's figures, drawn from numbers (never typed in) and redrawable from a run folder's logs alone.

Every plotting function returns the matplotlib ``Figure`` and, given ``path``, also saves it there (PNG at
120 dpi, parent folders created). The figure is **closed** before it is returned (``plt.close``): pyplot then
forgets it, so Jupyter's inline backend does not draw it a second time at the end of the cell, and a live
plot redrawn in a loop (``clear_output(wait=True)`` + ``display(fig)``) leaves exactly one image, not one per
redraw. ``display(fig)`` (or the figure as a cell's last expression) still renders it: one image per call.
The "what to look for" lines live next to each call in the notebooks.

``redraw_run(run_dir)`` (or ``python -m sawyer.plots RUN_DIR``) rebuilds every figure it can from the logs
the notebooks write into the run folder, so a disconnected Colab session loses no plot:

=================================  ============================================================
``01_summaries/ppo_log.jsonl``     PPO log of notebook 01 (one row per step, with ``step``)
``03_reward_model/reward_log.jsonl`` reward-model training log (``step`` plus loss/accuracy keys)
``04_ppo/ppo_log.jsonl``           PPO log of notebook 04
``05_evaluation/eval_rewards.jsonl`` rows ``{"prompt_id", "model", "reward", "length"}``
``05_evaluation/benchmarks.json``  ``{name: {"accuracy", "ci_low", "ci_high", "n"}}``
=================================  ============================================================
"""
from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np


def _finish(fig, path=None):
    """Lay out, save to ``path`` if given, and close ``fig`` (see the module docstring); returns ``fig``."""
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    plt.close(fig)  # pyplot forgets it: no second copy from the inline backend, no stale copies in live loops
    return fig


def _ema(values: np.ndarray, smooth: float) -> np.ndarray:
    """TensorBoard-style exponential moving average; ``smooth`` in [0, 1), 0 = no smoothing."""
    out, acc = np.empty_like(values), values[0]
    for i, v in enumerate(values):
        acc = smooth * acc + (1 - smooth) * v
        out[i] = acc
    return out


def _numeric_keys(records: list[dict]) -> list[str]:
    keys: dict[str, None] = {}
    for r in records:
        keys.update((k, None) for k, v in r.items()
                    if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool))
    return list(keys)


def training_curves(records: list[dict], keys=("objective/score", "objective/kl"), smooth: float = 0.6,
                    path=None, title: str | None = None):
    """One panel per logged metric against ``step``: the raw values faint, an EMA (``smooth``) on top.

    ``records`` are log rows (e.g. from ``read_jsonl``); rows without a metric are skipped for that panel,
    so metrics logged at different intervals share one figure. ``keys=None`` plots every numeric key.
    """
    keys = _numeric_keys(records) if keys is None else list(keys)
    present = set(_numeric_keys(records))
    missing = [k for k in keys if k not in present]
    if missing or not keys:
        raise ValueError(f"training_curves: metric(s) {missing or keys} not in the records; "
                         f"available: {sorted(present)}")
    ncols = min(3, len(keys))
    nrows = -(-len(keys) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.remove()  # unused cells of the last row
    for ax, key in zip(axes.flat, keys):
        rows = [(r.get("step", i), r[key]) for i, r in enumerate(records) if key in r]
        x, y = (np.asarray(v, dtype=float) for v in zip(*rows))
        ax.plot(x, y, alpha=0.3, color="C0")
        ax.plot(x, _ema(y, smooth), color="C0", label=f"EMA {smooth}")
        ax.set(title=key, xlabel="step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _finish(fig, path)


def reward_boxplot(groups: dict, path=None, ylabel: str = "reward", title: str = "Reward by model"):
    """Box plot per group (median, quartiles, 1.5 IQR whiskers, outliers) with the mean as a white dot."""
    fig, ax = plt.subplots(figsize=(1.8 * len(groups) + 2, 3.6))
    data = [np.asarray(v, dtype=float) for v in groups.values()]
    ax.boxplot(data, tick_labels=list(groups))
    ax.scatter(range(1, len(data) + 1), [d.mean() for d in data], color="white", edgecolor="black",
               zorder=3, label="mean")
    ax.set(ylabel=ylabel, title=title)
    ax.legend(loc="lower right")
    return _finish(fig, path)


def reward_histograms(groups: dict, bins: int = 30, path=None, xlabel: str = "reward",
                      title: str = "Reward distributions"):
    """Overlaid histograms on shared bins, a dashed line at each group's mean."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    data = {k: np.asarray(v, dtype=float) for k, v in groups.items()}
    edges = np.histogram_bin_edges(np.concatenate(list(data.values())), bins=bins)
    for i, (name, x) in enumerate(data.items()):
        ax.hist(x, bins=edges, alpha=0.45, color=f"C{i}", label=f"{name} (mean {x.mean():.2f})")
        ax.axvline(x.mean(), color=f"C{i}", linestyle="--")
    ax.set(xlabel=xlabel, ylabel="count", title=title)
    ax.legend()
    return _finish(fig, path)


def margin_histogram(margins, bins: int = 30, path=None):
    """Reward-model margins ``r(better) - r(worse)`` on held-out pairs; right of 0 = ranked correctly."""
    m = np.asarray(margins, dtype=float)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.hist(m, bins=bins, color="C2", alpha=0.8)
    ax.axvline(0.0, color="black", linewidth=1)
    ax.set(xlabel="r(better) - r(worse)", ylabel="pairs",
           title=f"Pairwise accuracy {np.mean(m > 0):.3f} on {m.size} pairs")
    return _finish(fig, path)


def length_scatter(lengths, rewards, label: str = "responses", path=None, unit: str = "words", truncated=None):
    """Reward against response length with a least-squares line (length bias); ``unit`` labels the x axis.

    ``truncated`` (a boolean per point, optional) marks answers the reward model only saw cut off at its
    token window: they are drawn as red crosses and left out of the fit and of the Pearson r in the title,
    because their reward describes a shorter text than their length says.
    """
    x, y = np.asarray(lengths, dtype=float), np.asarray(rewards, dtype=float)
    cut = np.zeros(x.shape, bool) if truncated is None else np.asarray(truncated, dtype=bool)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.scatter(x[~cut], y[~cut], s=12, alpha=0.6, label=label)
    if cut.any():
        ax.scatter(x[cut], y[cut], s=24, marker="x", color="C3", label=f"truncated ({int(cut.sum())}, not in fit)")
    xk, yk = x[~cut], y[~cut]
    r = float(np.corrcoef(xk, yk)[0, 1]) if xk.size > 1 and xk.std() > 0 and yk.std() > 0 else float("nan")
    if xk.size > 1 and xk.std() > 0:
        slope, intercept = np.polyfit(xk, yk, 1)
        xs = np.linspace(xk.min(), xk.max(), 2)
        ax.plot(xs, slope * xs + intercept, color="C3", label=f"fit: {slope:+.3g} per {unit.rstrip('s')}")
    ax.set(xlabel=f"response length ({unit})", ylabel="reward", title=f"{label}: Pearson r = {r:.2f}")
    ax.legend(fontsize="small")
    return _finish(fig, path)


def spotcheck_bar(answers: list[str], rewards, width: int = 60, path=None):
    """Horizontal bars of the reward of a few hand-picked answers, each labelled with its (shortened) text."""
    y = np.asarray(rewards, dtype=float)
    labels = [a if len(a) <= width else a[:width - 3] + "..." for a in (s.replace("\n", " ") for s in answers)]
    labels = [textwrap.fill(a, 32, break_long_words=True) for a in labels]  # at most 2 lines at width 60
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(labels) + 1.2))
    bars = ax.barh(range(len(labels)), y, color=["C0" if v >= 0 else "C3" for v in y])
    ax.bar_label(bars, fmt="%.2f", padding=3)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.margins(x=0.15)  # room for the value labels
    ax.set(xlabel="reward", title="Spot check")
    return _finish(fig, path)


def accuracy_bars(results: dict, path=None, title: str = "Benchmark accuracy (95% Wilson CI)", chance=None):
    """Accuracy per benchmark/model with error bars from each result's ``ci_low``/``ci_high``.

    ``chance`` (a number, or one per name as a dict) draws the chance level as a dashed line over each bar,
    e.g. 1/k for k-choice questions, or each result's own ``chance`` key when it has one: a bar whose interval
    reaches the line is indistinguishable from guessing.
    """
    names = list(results)
    acc = np.array([results[n]["accuracy"] for n in names], dtype=float)
    err = np.array([[a - results[n]["ci_low"] for n, a in zip(names, acc)],
                    [results[n]["ci_high"] - a for n, a in zip(names, acc)]])  # (2, N): below, above
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.6))
    bars = ax.bar(range(len(names)), acc, yerr=err, capsize=4, color=[f"C{i}" for i in range(len(names))])
    ax.bar_label(bars, fmt="%.3f", padding=2, label_type="center")
    levels = [chance.get(n) if isinstance(chance, dict) else chance if chance is not None
              else results[n].get("chance") for n in names]
    marked = [(i, v) for i, v in enumerate(levels) if v is not None]
    if marked:
        ax.hlines([v for _, v in marked], [i - 0.45 for i, _ in marked], [i + 0.45 for i, _ in marked],
                  colors="black", linestyles="--", label="chance")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set(ylim=(0, 1), ylabel="accuracy", title=title)
    if marked:
        ax.legend(loc="upper right", fontsize="small")
    return _finish(fig, path)


def word_shift_bars(shift: dict, baseline: dict | None = None, top: int = 12, path=None):
    """The ``top`` words of ``textstats.word_log_odds`` by |z|: bars of z (right: more frequent after RL).

    Dashed lines at +-``z_crit`` (the Bonferroni cut-off: bars beyond them are significant); with
    ``baseline`` (``textstats.no_change_baseline``), a grey band up to its largest |z|: the size of "shift"
    that two halves of unchanged text already show. A bar inside the band is noise.
    """
    table = shift["table"].head(top)
    z = table["z"].to_numpy(dtype=float)
    y = np.arange(len(table))
    fig, ax = plt.subplots(figsize=(6, 0.35 * len(table) + 1.6))
    if baseline is not None:
        m = baseline["max_abs_z"]
        ax.axvspan(-m, m, color="0.85", label=f"no-change baseline (|z| <= {m:.1f})")
    ax.barh(y, z, color=["C2" if v > 0 else "C3" for v in z])
    for v in (-shift["z_crit"], shift["z_crit"]):
        ax.axvline(v, color="black", linestyle="--", linewidth=1)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(y, list(table["word"]))
    ax.invert_yaxis()
    ax.set(xlabel="z of the log-odds ratio (after vs before)",
           title=f"Word shift (dashed: significance cut-off |z| = {shift['z_crit']:.1f})")
    if baseline is not None:
        ax.legend(loc="lower right", fontsize="small")
    return _finish(fig, path)


# --------------------------------------------------------------------------- redraw from a run folder


def read_jsonl(path) -> list[dict]:
    """Rows of a JSON-lines file (blank lines skipped); a bad line raises naming the file and line."""
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not valid JSON ({e})") from e
    return rows


def _require(rows: list[dict], fields: tuple, path) -> list[dict]:
    for n, r in enumerate(rows, start=1):
        if missing := [f for f in fields if f not in r]:
            raise ValueError(f"{path}, row {n}: missing field(s) {missing}; expected {list(fields)}")
    return rows


def _ppo_keys(records):
    present = set(_numeric_keys(records))
    keys = [k for k in ("objective/score", "objective/kl", "objective/entropy", "policy/clipfrac")
            if k in present]
    return keys or None


def redraw_run(run_dir) -> list[Path]:
    """Redraw every figure the logs in ``run_dir`` allow into ``run_dir/figures``; return the files written.

    A missing log is skipped with a printed note naming the file, so a half-finished run still gets the
    figures of the stages it completed.
    """
    run, written = Path(run_dir), []
    figures = run / "figures"

    def save(fig, name):
        written.append(figures / name)
        _finish(fig, figures / name)
        plt.close(fig)

    def present(rel):
        if (run / rel).is_file():
            return run / rel
        print(f"redraw_run: skipped the figures of {rel}: {run / rel} not found")
        return None

    for rel, name, title in [("01_summaries/ppo_log.jsonl", "01_training_curves.png", "Notebook 01: PPO"),
                             ("04_ppo/ppo_log.jsonl", "04_training_curves.png", "Notebook 04: PPO")]:
        if p := present(rel):
            records = read_jsonl(p)
            save(training_curves(records, keys=_ppo_keys(records), title=title), name)
    if p := present("03_reward_model/reward_log.jsonl"):
        save(training_curves(read_jsonl(p), keys=None, title="Notebook 03: reward model"),
             "03_reward_training.png")
    if p := present("05_evaluation/eval_rewards.jsonl"):
        rows = _require(read_jsonl(p), ("prompt_id", "model", "reward", "length"), p)
        models = list(dict.fromkeys(r["model"] for r in rows))
        rewards = {m: [r["reward"] for r in rows if r["model"] == m] for m in models}
        save(reward_boxplot(rewards), "05_reward_boxplot.png")
        save(reward_histograms(rewards), "05_reward_histograms.png")
        for m in models:
            mine = [r for r in rows if r["model"] == m]
            save(length_scatter([r["length"] for r in mine], [r["reward"] for r in mine], label=m),
                 f"05_length_vs_reward_{re.sub(r'[^A-Za-z0-9_.-]+', '_', m)}.png")
    if p := present("05_evaluation/benchmarks.json"):
        results = json.loads(p.read_text(encoding="utf-8"))
        _require(list(results.values()), ("accuracy", "ci_low", "ci_high"), p)
        save(accuracy_bars(results), "05_benchmarks.png")
    return written


def main(argv=None) -> int:
    """``python -m sawyer.plots RUN_DIR``: redraw a run's figures and list them."""
    import argparse

    import matplotlib

    matplotlib.use("Agg")  # files only, no window
    parser = argparse.ArgumentParser(prog="python -m sawyer.plots", description=main.__doc__)
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    if not args.run_dir.is_dir():
        parser.error(f"{args.run_dir} is not a folder")
    for path in redraw_run(args.run_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
