"""The report of ``python -m trgrpo compare``: ``OUT/report.md``, ``OUT/accuracy.png``, ``OUT/grad_norm.png``.

Reads every run folder (``done.json``, ``failed.json``, ``metrics.csv``), summarises each finished run with
``trgrpo.compare.stats`` and writes one table per question: every run, each strategy's mean over seeds with
a 95% t interval, each strategy's paired difference to the baseline seed by seed, extra diagnostics.
"""

from __future__ import annotations

import math
import os
import platform
import re
import shlex
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from trgrpo.compare.runs import DONE, FAILED, SETTINGS, Run, fmt_seconds, read_json
from trgrpo.compare.stats import (
    CI_METHOD,
    SPIKE_FACTOR,
    band,
    bucket_order,
    failed_collapse,
    mean_ci,
    noise_note,
    paired_differences,
    read_curves,
    smooth,
    summarise,
)

# (key of comparestats.summarise, column title, digits)
METRICS = [
    ("final_accuracy", "final held-out acc", 3),
    ("best_accuracy", "best held-out acc", 3),
    ("accuracy_auc", "acc AUC (mean over RL steps)", 3),
    ("grad_norm_mean", "grad norm mean", 3),
    ("grad_norm_std", "grad norm std", 3),
    ("grad_change_mean", "mean abs(Δ grad norm)", 3),
    ("grad_change_std", "std abs(Δ grad norm)", 3),
    ("grad_change_relative", "mean abs(Δ grad norm) / grad norm mean", 3),
]
PAIRED = [
    "final_accuracy",
    "best_accuracy",
    "accuracy_auc",
    "grad_norm_mean",
    "grad_change_mean",
    "grad_change_relative",
    "grad_norm_p95",
    "entropy_ratio",
]
TITLES = {key: title for key, title, _ in METRICS}


def run_status(run: Run) -> str:
    if (run.folder / DONE).is_file():
        return "done"
    if (run.folder / FAILED).is_file():
        return "failed"
    return "unfinished" if run.folder.exists() else "not run"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(str(c) for c in row) + " |" for row in rows),
        "",
    ]


def _f(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


STABILITY = [
    ("grad_norm_peak", "peak grad norm", 3),
    ("grad_norm_p95", "p95 grad norm", 3),
    ("grad_spikes", f"steps with grad norm > {SPIKE_FACTOR:g}x median", 1),
    ("entropy_ratio", "entropy end / start", 3),
    ("accuracy_max_drop", "largest held-out acc drop", 3),
]
NOT_EXTRAS = {*TITLES, *(k for k, _, _ in STABILITY), "rl_steps", "collapsed", "collapse_reason"}


def slug(point: str) -> str:
    """A file-name-safe form of a grid point's label."""
    return re.sub(r"[^A-Za-z0-9.=,+-]+", "_", point)


def collapse_of(run: Run, status: str, summary: dict, record: dict) -> str | None:
    """Why a run collapsed ('' if it did not); None for a run that says nothing (not finished, or failed for
    another reason than non-finite numbers)."""
    if status == "done":
        return summary.get("collapse_reason", "")
    if status == "failed":
        return failed_collapse(record.get("stderr_tail", "")) or None
    return None


def write_report(out: Path, runs: Sequence[Run], args, session_s: float = 0.0) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sweep = read_json(out / SETTINGS) or {}
    status = {r: run_status(r) for r in runs}
    curves = {r: read_curves(r.folder / "metrics.csv") for r in runs if status[r] == "done"}
    summary = {r: summarise(c) for r, c in curves.items()}
    records = {r: read_json(r.folder / DONE) or read_json(r.folder / FAILED) or {} for r in runs}
    collapse = {r: collapse_of(r, status[r], summary.get(r, {}), records[r]) for r in runs}
    run_seconds = sum(float(rec.get("wall_s", 0.0)) for rec in records.values())
    strategies = list(dict.fromkeys(r.strategy for r in runs))
    points = list(dict.fromkeys(r.point for r in runs))
    gridded = points != [""]
    rl_axis = all(c.rl_steps_axis for c in curves.values())
    x_name = "RL step" if rl_axis else "logged step (Lightning's step: optimiser updates)"

    command = (
        shlex.join(["python", "-m", "trgrpo", "compare", *sweep.get("argv", [])]) if sweep else "(unknown)"
    )
    lines = [
        "# Strategy comparison",
        "",
        f"- command: `{command}`",
        f"- base config: `{sweep.get('base', args.base)}`",
        "- strategies (fragments): "
        + ", ".join(f"{r.strategy} (`{r.fragment}`)" for r in {r.strategy: r for r in runs}.values()),
        f"- seeds: {', '.join(str(s) for s in dict.fromkeys(r.seed for r in runs))} (paired: seed S runs "
        "every strategy with seed_everything S and data.seed S)",
        f"- RL steps per run: {sweep.get('rl_steps') or 'as the base config sets'}",
        f"- extra fit arguments: `{shlex.join(sweep.get('extra', []))}`"
        if sweep.get("extra")
        else "- extra fit arguments: none",
    ]
    if gridded:
        values = sweep.get("grid_values", {})
        lines.append(
            "- grid points: "
            + ", ".join(f"`{p}`" + (f" ({values[p]})" if values.get(p, p) != p else "") for p in points)
        )
    lines += [
        f"- machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        f"- date: {datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- total wall time: {fmt_seconds(run_seconds)} in runs (sum over runs, any session); "
        f"this invocation {fmt_seconds(session_s)}",
        f"- x axis: {x_name}",
        f"- confidence intervals: {CI_METHOD}",
        "",
    ]
    if args.baseline not in strategies:
        lines += [f"Baseline `{args.baseline}` is not among the strategies: no paired differences.", ""]
    lines += _runs_table(runs, status, summary, records, collapse, gridded)

    for point in points:
        here = [r for r in runs if r.point == point]
        lines += _point_section(point, here, summary, collapse, args.baseline)
        plots = write_plots(
            out, strategies, here, {r: c for r, c in curves.items() if r in here}, x_name, slug(point)
        )
        if plots:
            title = f"## Plots ({point})" if gridded else "## Plots"
            lines += [title, ""] + [f"![{t}]({name})\n\n{caption}\n" for name, t, caption in plots]
    if gridded:
        lines += _grid_table(points, strategies, runs, summary, collapse)
        if write_collapse_plot(out, points, strategies, runs, collapse):
            lines += ["![collapse rate against the grid point](collapse.png)", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def _runs_table(runs, status, summary, records, collapse, gridded: bool) -> list[str]:
    rows = []
    for r in runs:
        s, rec = summary.get(r, {}), records[r]
        note = rec.get("error", "") if status[r] == "failed" else ""
        if note:
            note += f"; see `{r.folder / 'stderr.log'}`"
        if collapse[r]:
            note = f"collapsed: {collapse[r]}" + (f"; {note}" if note else "")
        rows.append(
            [
                *([r.point] if gridded else []),
                r.strategy,
                r.seed,
                "**FAILED**" if status[r] == "failed" else status[r],
                _f(s.get("rl_steps", math.nan), 0),
                _f(s.get("final_accuracy", math.nan)),
                _f(s.get("best_accuracy", math.nan)),
                _f(s.get("accuracy_auc", math.nan)),
                _f(s.get("grad_norm_mean", math.nan)),
                _f(rec.get("wall_s", math.nan), 0),
                note,
            ]
        )
    header = ["strategy", "seed", "status", "last x", "final acc", "best acc", "acc AUC", "grad norm mean"]
    return [
        "## Runs",
        "",
        *_table([*(["grid point"] if gridded else []), *header, "wall s", "note"], rows),
        "Only finished runs (`done`) enter the statistics below; a run that failed on non-finite numbers "
        "counts as collapsed.",
        "",
    ]


def _point_section(point: str, runs, summary, collapse, baseline: str) -> list[str]:
    """Per-strategy, stability, paired and extra tables of one grid point (of the sweep without a grid)."""
    at = f" ({point})" if point else ""
    strategies = list(dict.fromkeys(r.strategy for r in runs))
    by = {s: {r.seed: summary[r] for r in runs if r.strategy == s and r in summary} for s in strategies}
    lines = [f"## Per strategy{at}: mean over seeds ± 95% t half-width", ""]
    rows = [
        [s, len(by[s]), *(mean_ci(v[key] for v in by[s].values()).fmt(d) for key, _, d in METRICS)]
        for s in strategies
    ]
    lines += _table(["strategy", "seeds", *(t for _, t, _ in METRICS)], rows)
    lines += [
        "- final held-out acc: `val/accuracy` at the last validation (greedy, held-out split); best: the "
        "highest validation; AUC: trapezoid area under accuracy against the RL step divided by the step "
        "range (a mean accuracy over training).",
        "- grad norm: `train/grad_norm` (pre-clip) over the run's steps; std over steps; abs(Δ grad norm): "
        "the absolute change between consecutive logged steps, its mean and std over steps.",
        "",
        f"## Stability{at}: mean over seeds ± 95% t half-width, collapsed runs",
        "",
    ]
    rows = []
    for s in strategies:
        verdicts = [collapse[r] for r in runs if r.strategy == s and collapse[r] is not None]
        rows.append(
            [
                s,
                len(by[s]),
                *(mean_ci(v[key] for v in by[s].values()).fmt(d) for key, _, d in STABILITY),
                f"{sum(bool(v) for v in verdicts)} / {len(verdicts)}",
            ]
        )
    lines += _table(["strategy", "seeds", *(t for _, t, _ in STABILITY), "collapsed"], rows)
    lines += [
        "Definitions and thresholds: docs/compare.md, 'Stability'.",
        "",
    ]
    if baseline in strategies:
        lines += [
            f"## Paired difference to {baseline}{at} (strategy − {baseline}, seed by seed)",
            "",
            "Per seed difference, then mean ± 95% t half-width over the seed pairs; 'inside the noise' "
            "means the interval contains 0.",
            "",
        ]
        digits = {k: d for k, _, d in METRICS + STABILITY}
        titles = {**TITLES, **{k: t for k, t, _ in STABILITY}}
        for key in PAIRED:
            rows = []
            for s in strategies:
                if s == baseline:
                    continue
                diff = mean_ci(
                    paired_differences(
                        {k: v[key] for k, v in by[s].items()}, {k: v[key] for k, v in by[baseline].items()}
                    ).values()
                )
                d = digits[key]
                interval = "n/a" if math.isnan(diff.half) else f"[{diff.low:+.{d}f}, {diff.high:+.{d}f}]"
                rows.append([s, diff.n, diff.fmt(d, signed=True), interval, noise_note(diff)])
            lines += [f"### {titles[key]}", ""] + _table(
                ["strategy", "pairs", "difference", "95% CI", "note"], rows
            )

    extras = sorted({k for v in by_runs(by) for k in v if k not in NOT_EXTRAS}, key=bucket_order)
    if extras:
        lines += [
            f"## Extra diagnostics{at}: mean over steps, then mean over seeds ± 95% t half-width",
            "",
            "`grad_share`: share of the squared logit-gradient norm of the surrogate from tokens whose "
            "rollout probability is in the bucket; `token_share`: share of the trained tokens; `weight`: "
            "their mean token weight (README, 'Where the gradient comes from').",
            "",
        ]
        for family in dict.fromkeys(bucket_order(k)[0] for k in extras):
            cols = [k for k in extras if bucket_order(k)[0] == family]
            rows = [
                [s, *(mean_ci(v.get(k, math.nan) for v in by[s].values()).fmt(3) for k in cols)]
                for s in strategies
            ]
            lines += _table(["strategy", *(f"`{k}`" for k in cols)], rows)
    return lines


def by_runs(by: dict) -> list[dict]:
    return [v for per_seed in by.values() for v in per_seed.values()]


def _grid_table(points, strategies, runs, summary, collapse) -> list[str]:
    """One row per grid point: each strategy's final accuracy (mean ± t half-width) and collapse count."""
    rows = []
    for p in points:
        row = [f"`{p}`"]
        for s in strategies:
            here = [r for r in runs if r.point == p and r.strategy == s]
            acc = mean_ci(summary[r]["final_accuracy"] for r in here if r in summary)
            verdicts = [collapse[r] for r in here if collapse[r] is not None]
            row.append(f"{acc.fmt(3)}; collapsed {sum(bool(v) for v in verdicts)} / {len(verdicts)}")
        rows.append(row)
    return [
        "## Across the grid: final held-out accuracy (mean ± 95% t half-width) and collapsed runs",
        "",
        *_table(["grid point", *strategies], rows),
    ]


def write_collapse_plot(out: Path, points, strategies, runs, collapse) -> bool:
    """``collapse.png``: the share of collapsed runs per strategy against the grid point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    drawn = False
    for k, s in enumerate(strategies):
        shift = (k - (len(strategies) - 1) / 2) * 0.06  # equal rates would hide each other's lines
        xs, ys = [], []
        for i, p in enumerate(points):
            here = [r for r in runs if r.point == p and r.strategy == s]
            verdicts = [collapse[r] for r in here if collapse[r] is not None]
            if verdicts:
                xs.append(i + shift)
                ys.append(sum(bool(v) for v in verdicts) / len(verdicts))
        if xs:
            ax.plot(xs, ys, "os^vDP*X"[k % 8] + "-", label=s, alpha=0.8)
            drawn = True
    if drawn:
        ax.set_xticks(range(len(points)), points, rotation=20, fontsize=8)
        ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel("collapsed runs / runs")
        ax.set_title("collapse rate per grid point (strategies drawn slightly apart)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "collapse.png", dpi=110)
    plt.close(fig)
    return drawn


def write_plots(
    out: Path, strategies: Sequence[str], runs: Sequence[Run], curves: dict, x_name: str, point: str = ""
) -> list:
    """Held-out accuracy and grad norm against the RL step: mean over seeds with a ±1 standard-error band
    (``accuracy.png``, ``grad_norm.png``; ``accuracy_<point>.png``... for a grid point)."""
    if not curves:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    longest = max((len(c.grad_norm) for c in curves.values()), default=0)
    window = max(1, longest // 25) | 1  # odd; light: a 25th of the run
    suffix = f"_{point}" if point else ""
    for name, attr, ylabel, win in [
        (f"accuracy{suffix}.png", "accuracy", "held-out accuracy (greedy)", 1),
        (f"grad_norm{suffix}.png", "grad_norm", "train/grad_norm (pre-clip)", window),
    ]:
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for s in strategies:
            series = [getattr(c, attr) for r, c in curves.items() if r.strategy == s]
            points = band(
                [list(zip([x for x, _ in p], smooth([y for _, y in p], win), strict=True)) for p in series]
            )
            if not points:
                continue
            xs, mean, se, _ = zip(*points, strict=True)
            lo = [m - (e if not math.isnan(e) else 0.0) for m, e in zip(mean, se, strict=True)]
            hi = [m + (e if not math.isnan(e) else 0.0) for m, e in zip(mean, se, strict=True)]
            (line,) = ax.plot(
                xs, mean, "o-" if attr == "accuracy" else "-", ms=3, label=f"{s} (n={len(series)})"
            )
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
        ax.set_title(
            f"{ylabel}: mean over seeds, ±1 standard error"
            + (" (smoothed)" if win > 1 else "")
            + (f"\n{point}" if point else ""),
            fontsize=10,
        )
        ax.set_xlabel(x_name)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        caption = "Mean over seeds; the band is ±1 standard error of the mean over seeds."
        if win > 1:
            caption += f" Each seed's curve is smoothed with a centred moving average of {win} logged steps."
        written.append((name, ylabel, caption))
    return written
