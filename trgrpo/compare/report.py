"""The report of ``python -m trgrpo compare``: ``OUT/report.md``, ``OUT/accuracy.png``, ``OUT/grad_norm.png``.

Reads every run folder (``done.json``, ``failed.json``, ``metrics.csv``), summarises each finished run with
``trgrpo.compare.stats`` and writes one table per question: every run, each strategy's mean over seeds with
a 95% t interval, each strategy's paired difference to the baseline seed by seed, extra diagnostics.
"""

from __future__ import annotations

import math
import os
import platform
import shlex
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from trgrpo.compare.runs import DONE, FAILED, SETTINGS, Run, fmt_seconds, read_json
from trgrpo.compare.stats import (
    CI_METHOD,
    band,
    bucket_order,
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


def write_report(out: Path, runs: Sequence[Run], args, session_s: float = 0.0) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sweep = read_json(out / SETTINGS) or {}
    strategies = list(dict.fromkeys(r.strategy for r in runs))
    status = {r: run_status(r) for r in runs}
    curves = {r: read_curves(r.folder / "metrics.csv") for r in runs if status[r] == "done"}
    summary = {r: summarise(c) for r, c in curves.items()}
    records = {r: read_json(r.folder / DONE) or read_json(r.folder / FAILED) or {} for r in runs}
    run_seconds = sum(float(rec.get("wall_s", 0.0)) for rec in records.values())

    by = {s: {r.seed: summary[r] for r in runs if r.strategy == s and r in summary} for s in strategies}
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

    lines += ["## Runs", ""]
    rows = []
    for r in runs:
        s, rec = summary.get(r, {}), records[r]
        note = rec.get("error", "") if status[r] == "failed" else ""
        if note:
            note += f"; see `{r.folder / 'stderr.log'}`"
        rows.append(
            [
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
    lines += _table(
        [
            "strategy",
            "seed",
            "status",
            "last x",
            "final acc",
            "best acc",
            "acc AUC",
            "grad norm mean",
            "wall s",
            "note",
        ],
        rows,
    )
    lines += ["Only finished runs (`done`) enter the statistics below.", ""]

    lines += ["## Per strategy: mean over seeds ± 95% t half-width", ""]
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
    ]

    if args.baseline in strategies:
        base = by[args.baseline]
        lines += [
            f"## Paired difference to {args.baseline} (strategy − {args.baseline}, seed by seed)",
            "",
            "Per seed difference, then mean ± 95% t half-width over the seed pairs; 'inside the noise' "
            "means the interval contains 0.",
            "",
        ]
        for key in PAIRED:
            digits = dict((k, d) for k, _, d in METRICS)[key]
            rows = []
            for s in strategies:
                if s == args.baseline:
                    continue
                diff = mean_ci(
                    paired_differences(
                        {k: v[key] for k, v in by[s].items()}, {k: v[key] for k, v in base.items()}
                    ).values()
                )
                interval = (
                    "n/a" if math.isnan(diff.half) else f"[{diff.low:+.{digits}f}, {diff.high:+.{digits}f}]"
                )
                rows.append([s, diff.n, diff.fmt(digits, signed=True), interval, noise_note(diff)])
            lines += [f"### {TITLES[key]}", ""] + _table(
                ["strategy", "pairs", "difference", "95% CI", "note"], rows
            )

    extras = sorted(
        {k for v in summary.values() for k in v if k not in TITLES and k != "rl_steps"}, key=bucket_order
    )
    if extras:
        lines += [
            "## Extra diagnostics: mean over steps, then mean over seeds ± 95% t half-width",
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

    plots = write_plots(out, strategies, runs, curves, x_name)
    if plots:
        lines += ["## Plots", ""] + [f"![{title}]({name})\n\n{caption}\n" for name, title, caption in plots]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def write_plots(out: Path, strategies: Sequence[str], runs: Sequence[Run], curves: dict, x_name: str) -> list:
    """Held-out accuracy and grad norm against the RL step: mean over seeds with a ±1 standard-error band."""
    if not curves:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    longest = max((len(c.grad_norm) for c in curves.values()), default=0)
    window = max(1, longest // 25) | 1  # odd; light: a 25th of the run
    for name, attr, ylabel, win in [
        ("accuracy.png", "accuracy", "held-out accuracy (greedy)", 1),
        ("grad_norm.png", "grad_norm", "train/grad_norm (pre-clip)", window),
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
            f"{ylabel}: mean over seeds, ±1 standard error" + (" (smoothed)" if win > 1 else ""), fontsize=10
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
