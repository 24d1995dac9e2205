"""One run per log folder: a lock file with the owner's pid, taken before the loggers start.

Two runs given the same explicit logger version would write into one folder, each overwriting the other's
``config.yaml`` and ``metrics.csv``.  ``LogFolderLock`` (taken by the CLI before ``fit`` or ``validate``)
refuses a folder a live run holds, and one holding an earlier run's logs unless the run resumes; a lock
whose process is gone (killed, even with SIGKILL, or a reused pid) is taken over.

    python -m trgrpo fit --config configs/demo.yaml --trainer.logger.init_args.version=a   # twice: refused
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import socket
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger

log = logging.getLogger(__name__)


LOCK_NAME = ".trgrpo.lock"
"""File in a logger's folder while a run writes there: ``{"pid", "host", "start"}`` of that process."""

RUN_FILES = ("metrics.csv", "hparams.yaml", "config.yaml")
"""Files a run leaves in its log folder: their presence means the folder holds an earlier run's logs."""


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks (Linux ``/proc``), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def _lock_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": process_start(os.getpid())}


def holder_alive(holder: dict) -> bool:
    """Whether the process named in a lock still runs (one on another host is assumed to)."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False  # an empty or torn lock file: its writer died before finishing it
    if holder.get("host") != socket.gethostname():
        return True
    if pid == os.getpid():
        return False  # this process: a lock it left from an earlier run in the same interpreter
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # it exists, owned by another user
        pass
    start = holder.get("start")
    return start is None or start == process_start(pid)  # another start time: the pid was reused


def read_lock(path: Path) -> dict | None:
    """The record in a lock file; None when there is none (an unreadable one counts as left by a dead run)."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def acquire_folder(folder: Path, key: str, resuming: bool) -> Path:
    """Take ``folder``'s lock for this process and return its path; ValueError naming ``key`` when a live
    run holds it, or when the folder holds an earlier run's logs and this run does not resume."""
    lock = folder / LOCK_NAME
    holder = read_lock(lock)
    if holder is not None and holder_alive(holder):
        raise ValueError(
            f"{key}: the log folder {folder} is in use by a running process (pid {holder.get('pid')} on "
            f"{holder.get('host')}); choose another version or wait for that run to end (if it is gone, "
            f"remove {lock})"
        )
    earlier = [name for name in RUN_FILES if (folder / name).exists()]
    if earlier and not resuming:
        raise ValueError(
            f"{key}: the log folder {folder} holds an earlier run's logs ({', '.join(earlier)}), which this "
            "run would overwrite; resume that run with --ckpt_path, choose another version, or remove the "
            "folder"
        )
    folder.mkdir(parents=True, exist_ok=True)
    if holder is not None:  # left by a run that is gone: set aside in one step, so one starter takes over
        aside = lock.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            os.rename(lock, aside)
            aside.unlink()
            log.warning("%s: took over the lock of a run that is gone (pid %s)", folder, holder.get("pid"))
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError as exc:
        raise ValueError(f"{key}: another run took the log folder {folder} at the same moment") from exc
    with os.fdopen(fd, "w") as f:
        json.dump(_lock_record(), f)
    return lock


class LogFolderLock:
    """Keep two runs out of one log folder; the CLI takes it before ``fit`` or ``validate`` starts.

    ``acquire`` (global rank 0, before the trainer starts its loggers: Lightning's CSV logger deletes a
    ``metrics.csv`` it finds) locks every local logger folder with a ``.trgrpo.lock`` file holding this
    process's pid, host and start time.  A folder locked by a live process is refused, and so is one holding
    an earlier run's logs (``metrics.csv``, ``hparams.yaml``, ``config.yaml``) unless this run resumes
    (``resuming``: ``--ckpt_path`` given), whose rows then follow the earlier ones in ``metrics.csv``.  A
    lock whose process is gone (killed, even with SIGKILL) is taken over; ``release`` removes the lock.
    """

    def __init__(self, resuming: bool = False) -> None:
        self.resuming = resuming
        self.held: list[Path] = []

    def acquire(self, trainer: L.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        for lg in trainer.loggers:
            folder = getattr(lg, "log_dir", None)
            if folder and "://" not in str(folder):
                key = f"trainer.logger ({type(lg).__name__}).init_args.version"
                self.held.append(acquire_folder(Path(folder), key, self.resuming))
                if self.resuming and isinstance(lg, CSVLogger):
                    keep_earlier_metrics(lg)

    def release(self) -> None:
        """Remove the locks this process holds (idempotent)."""
        for lock in self.held:
            if (read_lock(lock) or {}).get("pid") == os.getpid():
                lock.unlink(missing_ok=True)
        self.held = []


def keep_earlier_metrics(logger: CSVLogger) -> None:
    """Let a resumed run append to its folder's ``metrics.csv``: Lightning's CSV writer deletes the file when
    it starts, so it is started here, and the earlier rows and their columns are put back."""
    path = Path(logger.log_dir) / "metrics.csv"
    if not path.is_file():
        return
    kept = path.read_bytes()
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    writer = logger.experiment  # removes metrics.csv
    path.write_bytes(kept)
    writer.metrics_keys = sorted(set(writer.metrics_keys) | set(header))  # new columns rewrite the header
