"""``python -m trgrpo compare``: every weighting strategy x every seed as its own ``fit``, then one report.

    python -m trgrpo compare --base configs/demo.yaml \\
        --strategies configs/weighting/grpo.yaml configs/weighting/tr_grpo.yaml --seeds 0 1 2 \\
        --rl_steps 200 --out results/demo [-- extra fit arguments for every run]

Each run is ``python -m trgrpo fit --config BASE --config FRAGMENT --seed_everything S --data.seed S`` with a
CSV logger writing into ``OUT/runs/<strategy>/seed<S>/`` (the strategy is the fragment's file stem), its
stdout and stderr streamed to ``stdout.log`` and ``stderr.log`` there; a run dies with the sweep, even one
killed with SIGKILL (Linux).  With ``--rl_steps N`` every run gets
the ``trgrpo.callbacks.RLStepLimit`` callback (N RL steps, whatever the optimiser updates per step) and a
``trainer.max_steps`` far above what N steps need.  A run that exits 0 gets ``done.json``; a rerun skips it
(unless its settings changed) and deletes and redoes any other run folder.  A failed run gets ``failed.json``
with the tail of its stderr; the sweep goes on.  ``--grid KEY=V1,V2`` (several make a product) runs every
strategy and seed at every grid point, ``OUT/runs/<KEY=V>/<strategy>/seed<S>/``, the value given to the run
as ``--KEY=V`` (``xF`` multiplies the base config's value by F); ``--jobs N`` runs N at once.  The report
(``OUT/report.md`` and PNG plots, see ``trgrpo.compare.report``) is written at the end, or alone with
``--report_only``.  docs/compare.md has more.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import yaml

from trgrpo.compare.grid import grid_points, grid_value
from trgrpo.compare.report import write_report
from trgrpo.compare.runs import (
    DONE,
    FAILED,
    SETTINGS,
    Grid,
    Run,
    fmt_seconds,
    grid_label,
    read_json,
    tail,
    write_json,
)
from trgrpo.sandbox import die_with_parent

WEIGHTING_DIR = Path("configs/weighting")
# the checkout this package runs from: bare strategy names and the default base also resolve there, so
# compare works from any folder (a path that exists where it is run from wins)
REPOSITORY = Path(__file__).resolve().parents[2]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    argv = list(argv)
    extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m trgrpo compare",
        description="Run every weighting strategy with every seed (paired: the same seed gives "
        "every strategy the same initialisation, warm-start and data order), then write OUT/report.md "
        "and plots. Arguments after '--' go to every 'fit' run unchanged.",
    )
    parser.add_argument("--base", default="configs/demo.yaml", help="base config (default: %(default)s)")
    parser.add_argument(
        "--strategies",
        nargs="+",
        metavar="FRAGMENT",
        help="weighting fragments (configs/weighting/*.yaml) or their names (grpo, tr_grpo, ...); "
        "the strategy name is the file stem",
    )
    parser.add_argument("--seeds", nargs="+", type=int, help="default: 0 1 2 (--report_only: the sweep's)")
    parser.add_argument(
        "--rl_steps",
        type=int,
        default=None,
        help="RL steps per run (trgrpo.callbacks.RLStepLimit); default: the base's max_steps",
    )
    parser.add_argument("--out", required=True, help="output folder (runs/, report.md, plots)")
    parser.add_argument(
        "--baseline", default="grpo", help="strategy of the paired differences (default: grpo)"
    )
    parser.add_argument(
        "--grid",
        action="append",
        default=None,
        metavar="KEY=V1,V2,...",
        help="run every strategy and seed at each value of a config key, e.g. model.optim.lr=1e-4,4e-4 "
        "(xF: F times the base config's value, e.g. model.optim.lr=x1,x4); several --grid flags make a "
        "product",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at once (default: %(default)s); each gets OMP_NUM_THREADS = CPUs / jobs unless set",
    )
    parser.add_argument("--report_only", action="store_true", help="write the report from existing runs only")
    parser.add_argument(
        "--heartbeat",
        type=float,
        default=60.0,
        help="seconds between 'still running' lines (0: none; default: %(default)s)",
    )
    args = parser.parse_args(argv)
    args.extra = extra
    previous = read_json(Path(args.out) / SETTINGS) if args.report_only else None
    if not args.strategies and previous:  # --report_only: the sweep's own strategies
        args.strategies = previous["fragments"]
    args.seeds = args.seeds or (previous or {}).get("seeds") or [0, 1, 2]
    if args.grid is None:
        args.grid = (previous or {}).get("grid") or []
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    if not args.strategies:
        parser.error("--strategies is required (except with --report_only on a folder a sweep wrote)")
    args.fragments = [resolve_fragment(s) for s in args.strategies]
    names = [Path(f).stem for f in args.fragments]
    if len(set(names)) != len(names):
        parser.error(f"two fragments share a file stem (the strategy name): {names}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"repeated seeds: {args.seeds}")
    if args.rl_steps is not None and args.rl_steps < 1:
        parser.error("--rl_steps must be >= 1")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out}: is a file; give a folder (created if missing)")
    args.base = resolve_config(args.base)
    if not args.report_only:
        for path in [args.base, *args.fragments]:
            if not Path(path).is_file():
                parser.error(f"no such config file: {path}")
    try:
        args.points = grid_points(args.grid)
        if not args.report_only:
            for point in args.points:
                for key, token in point:
                    grid_value(args.base, key, token)
    except ValueError as e:
        parser.error(str(e))
    return args


def resolve_config(path: str) -> str:
    """``path`` as given when it exists here, else the same relative path in the repository, else as given
    (the caller reports it missing)."""
    if Path(path).is_file() or Path(path).is_absolute() or not (REPOSITORY / path).is_file():
        return path
    return str(REPOSITORY / path)


def resolve_fragment(name: str) -> str:
    """A fragment path as given, or ``configs/weighting/<name>.yaml`` (here, else in the repository) for a
    bare strategy name."""
    if Path(name).is_file():
        return name
    for candidate in (WEIGHTING_DIR / f"{name}.yaml", REPOSITORY / WEIGHTING_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return str(candidate)
    return resolve_config(name)


def plan(
    out: Path, fragments: Sequence[str], seeds: Sequence[int], points: Sequence[Grid] = ((),)
) -> list[Run]:
    """Seed by seed, every grid point and strategy: a partial sweep holds complete pairs everywhere early.
    Folders: ``runs/<strategy>/seed<S>`` without a grid, ``runs/<point>/<strategy>/seed<S>`` with one."""
    runs = []
    for s in seeds:
        for point in points:
            where = out / "runs" / grid_label(point) if point else out / "runs"
            runs += [Run(Path(f).stem, f, s, where / Path(f).stem / f"seed{s}", point) for f in fragments]
    return runs


def fit_command(run: Run, base: str, rl_steps: int | None, extra: Sequence[str]) -> list[str]:
    """The ``fit`` command line of one run (the CSV logger's folder is the run folder)."""
    logger = {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(run.folder.parent), "name": "", "version": run.folder.name},
    }
    cmd = [
        sys.executable,
        "-m",
        "trgrpo",
        "fit",
        "--config",
        base,
        "--config",
        run.fragment,
        "--seed_everything",
        str(run.seed),
        "--data.seed",
        str(run.seed),
        "--trainer.logger",
        json.dumps(logger),
    ]
    if rl_steps is not None:
        limit = {"class_path": "trgrpo.callbacks.RLStepLimit", "init_args": {"steps": rl_steps}}
        # the callback ends the run; max_steps only bounds it if something went wrong (Lopti makes 2
        # optimiser updates per RL step, more with several epochs or mini-batches)
        cmd += ["--trainer.max_steps", str(rl_steps * 64), f"--trainer.callbacks+={json.dumps(limit)}"]
    cmd += [f"--{key}={grid_value(base, key, token)}" for key, token in run.grid]
    return cmd + list(extra)


def config_digest(path: str) -> str | None:
    """A digest of a YAML file's parsed content (comments and layout do not count); None if unreadable."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def settings(run: Run, base: str, rl_steps: int | None, extra: Sequence[str]) -> dict:
    """What determines a run's result: a finished run with other settings (or edited configs) is redone."""
    return {
        "base": base,
        "fragment": run.fragment,
        "seed": run.seed,
        "rl_steps": rl_steps,
        "extra": list(extra),
        "base_digest": config_digest(base),
        "fragment_digest": config_digest(run.fragment),
        **({"grid": [[k, grid_value(base, k, v)] for k, v in run.grid]} if run.grid else {}),
    }


class Stopped(Exception):
    """The sweep is stopping (another run's worker saw the interrupt)."""


def execute(
    run: Run,
    cmd: Sequence[str],
    heartbeat: float,
    say: Callable[[str], None],
    env: dict[str, str] | None = None,
    stop: threading.Event | None = None,
) -> tuple[int, float]:
    """Run one command with its output streamed to the run folder; returns (exit status, seconds).
    ``env`` adds variables; a set ``stop`` terminates the run (``Stopped``)."""
    run.folder.mkdir(parents=True, exist_ok=True)
    (run.folder / "command.txt").write_text(shlex.join(cmd) + "\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    start = time.monotonic()
    with open(run.folder / "stdout.log", "wb") as out, open(run.folder / "stderr.log", "wb") as err:
        # tied to this process: a sweep killed outright (SIGKILL, out of memory) takes its run along, where
        # an orphaned fit would train on to the end unseen (Linux; elsewhere the except below only)
        proc = subprocess.Popen(
            list(cmd),
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=env,
            preexec_fn=functools.partial(die_with_parent, os.getpid()),
        )
        try:
            last = start
            while True:
                try:
                    code = proc.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    if stop is not None and stop.is_set():
                        raise Stopped from None
                    if heartbeat > 0 and time.monotonic() - last >= heartbeat:
                        last = time.monotonic()
                        say(f"    {run.label}: running for {fmt_seconds(last - start)}")
        except BaseException:  # interrupted: stop the run (SIGTERM first: it exits promptly), then re-raise
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
    return code, time.monotonic() - start


def sweep(
    runs: Sequence[Run],
    command: Callable[[Run], list[str]],
    keys: Callable[[Run], dict],
    heartbeat: float = 60.0,
    say: Callable[[str], None] = print,
    jobs: int = 1,
    env: dict[str, str] | None = None,
) -> dict[Run, str]:
    """Run what is not finished yet, ``jobs`` at once; returns each run's status ("done", "skipped" or
    "failed").  An interrupt stops every run that is going (none of them gets ``done.json``)."""
    status: dict[Run, str] = {}
    durations: list[float] = []
    todo = []
    for run in runs:
        done = read_json(run.folder / DONE)
        if done is not None and done.get("settings") == keys(run):
            status[run] = "skipped"
            durations.append(float(done.get("wall_s", 0.0)))
        else:
            if done is not None:
                say(f"{run.label}: finished with other settings ({run.folder}); redoing it")
            todo.append(run)
    say(f"compare: {len(runs)} runs, {len(runs) - len(todo)} finished earlier (skipped), {len(todo)} to run")
    start = time.monotonic()
    lock, stop = threading.Lock(), threading.Event()

    def one(i: int, run: Run) -> None:
        if run.folder.exists():  # unfinished, failed or stale: start it again from nothing
            shutil.rmtree(run.folder)
        with lock:
            left = (len(todo) - i + 1) / jobs
            eta = (
                f"ETA {fmt_seconds(sum(durations) / len(durations) * left)}"
                if durations
                else "ETA after the first run"
            )
        say(
            f"[{i}/{len(todo)}] {run.label}: started (sweep elapsed {fmt_seconds(time.monotonic() - start)}, "
            f"{eta}); output in {run.folder}/stdout.log"
        )
        cmd = command(run)
        code, seconds = execute(run, cmd, heartbeat, say, env, stop)
        finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
        record = {
            "strategy": run.strategy,
            "seed": run.seed,
            **({"grid": run.point} if run.grid else {}),
            "returncode": code,
            "wall_s": round(seconds, 2),
            "finished": finished,
            "command": cmd,
            "settings": keys(run),
        }
        if code == 0 and (run.folder / "metrics.csv").is_file():
            write_json(run.folder / DONE, record)
            with lock:
                durations.append(seconds)
                status[run] = "done"
            say(f"[{i}/{len(todo)}] {run.label}: done in {fmt_seconds(seconds)}")
        else:
            why = f"exit status {code}" if code != 0 else "exit status 0 but no metrics.csv"
            record["error"] = why
            record["stderr_tail"] = tail(run.folder / "stderr.log")
            write_json(run.folder / FAILED, record)
            with lock:
                status[run] = "failed"
            indented = "\n".join("      " + line for line in record["stderr_tail"].splitlines()[-8:])
            say(
                f"[{i}/{len(todo)}] {run.label}: FAILED ({why}) after {fmt_seconds(seconds)}; full log in "
                f"{run.folder}/stderr.log; last lines:\n{indented}"
            )

    if jobs <= 1:
        for i, run in enumerate(todo, 1):
            one(i, run)
        return status
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(one, i, run) for i, run in enumerate(todo, 1)]
        try:
            for future in futures:
                try:
                    future.result()
                except Stopped:
                    pass
        except BaseException:  # interrupted: the workers stop their runs, nothing new starts
            stop.set()
            for future in futures:
                future.cancel()
            raise
    return status


def job_threads(jobs: int) -> dict[str, str]:
    """The environment of each run when ``jobs`` share the machine: the CPUs split between them (a thread
    count the user set wins)."""
    if jobs <= 1 or "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        argv = argv[1:]
    args = parse_args(argv)
    out = Path(args.out)
    runs = plan(out, args.fragments, args.seeds, args.points)
    started, failed = time.monotonic(), []
    if not args.report_only:
        out.mkdir(parents=True, exist_ok=True)
        write_json(
            out / SETTINGS,
            {
                "argv": argv,
                "base": args.base,
                "fragments": args.fragments,
                "seeds": args.seeds,
                "rl_steps": args.rl_steps,
                "extra": args.extra,
                "grid": args.grid,
                "grid_values": {
                    grid_label(p): grid_label(tuple((k, grid_value(args.base, k, v)) for k, v in p))
                    for p in args.points
                    if p
                },
                "jobs": args.jobs,
            },
        )

        def handle_sigterm(signum, frame):
            raise SystemExit(143)

        handler = signal.signal(signal.SIGTERM, handle_sigterm)
        try:
            status = sweep(
                runs,
                lambda r: fit_command(r, args.base, args.rl_steps, args.extra),
                lambda r: settings(r, args.base, args.rl_steps, args.extra),
                args.heartbeat,
                jobs=args.jobs,
                env=job_threads(args.jobs),
            )
        except (KeyboardInterrupt, SystemExit):
            print(
                "compare: interrupted; the run that was going has no done.json "
                "and starts again on the next call"
            )
            raise
        finally:
            signal.signal(signal.SIGTERM, handler)
        failed = [r.label for r, s in status.items() if s == "failed"]
        if failed:
            print(f"compare: {len(failed)} run(s) failed: {', '.join(failed)}")

    report = write_report(out, runs, args, session_s=time.monotonic() - started)
    print(f"compare: report written to {report}")
    return 1 if not args.report_only and failed else 0  # a failed run is in the report and the exit status
