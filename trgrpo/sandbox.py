"""Killable worker processes for code that reads model output: verifiers, scorers and untrusted rewards.

A policy explores, and sooner or later it writes ``__import__('os').system(...)`` or ``9**9**9**9`` where an
answer should be; several reasoning-gym scorers hand the answer to ``eval`` or ``sympy.parse_expr``, and
math-verify can spend hours in one C call.  Such checks run here, in a pool of worker processes that

- start fresh (``python -c``: nothing is forked from the trainer, so no model, optimiser or data is there)
  with a reduced environment (``PATH``, ``HOME``, locale, temp dir and Python's own variables: no tokens);
- die with the trainer, even after ``kill -9`` of it: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` on Linux, set by
  each worker as it starts, and a check that the trainer is still its parent;
- run each job under a per-job ``timeout``: a worker that outlives it is killed, the job is reported as
  timed out (the caller scores it as failed) and the worker is started again when next needed;
- run under a memory limit (``RLIMIT_AS``, ``memory_mb``): a runaway allocation raises ``MemoryError`` in
  the worker instead of taking the machine's memory;
- refuse, through an audit hook (PEP 578) installed once the worker has imported what it needs, what a stray
  answer would do: start processes, write, move or delete files, open sockets, load code through ctypes,
  signal other processes, raise resource limits.  A refused call raises ``PermissionError`` inside the
  verifier (which then scores the answer as it would any bad answer), and the trainer logs it once.

The hook is defence in depth against what a policy stumbles into, not a security boundary against code
written to escape it: train untrusted models or data inside a container.  Jobs go to a worker pickled (the
trainer's own data); replies come back as JSON, so nothing a worker says can run code in the trainer::

    pool = get_pool(workers=2, timeout=5.0, preload=("trgrpo.tasks.math_data:warm_up",))
    pool.map("trgrpo.tasks.math_data:check_answer", [(("42", "\\\\boxed{42}", None), {})])
    # -> [JobResult(status="ok", value=True, refused=())]

Functions are named ``"module:qualified_name"`` and must be importable in a fresh interpreter with the
trainer's ``sys.path``.  Pools are shared per process and settings (``get_pool``), start on first use, stay
up between steps and stop at exit.  ``time_limit`` bounds every ``map`` of the calling thread (the reward
timeout of a reward that scores in a pool, see ``trgrpo.rewards``).
"""

from __future__ import annotations

import atexit
import importlib
import json
import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from multiprocessing.connection import wait
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0
"""Seconds one job may run before its worker is killed."""
DEFAULT_MEMORY_MB = 2048
"""Address-space limit of a worker in MiB (a worker with sympy and reasoning-gym loaded uses about 300)."""
DEFAULT_WORKERS = 4
"""Worker processes of a verifier: answers are checked side by side, so a slow one holds up no other."""
START_ALLOWANCE = 10.0
"""Seconds allowed for (re)starting a worker: one killed for a timeout is replaced before its next job."""

REFUSED_EVENTS = (
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "os.forkpty",
    "subprocess.Popen",
    "pty.spawn",
    "os.kill",
    "os.killpg",
    "signal.pthread_kill",
    "os.remove",
    "os.rename",
    "os.rmdir",
    "os.mkdir",
    "os.chmod",
    "os.chown",
    "os.chflags",
    "os.lchflags",
    "os.link",
    "os.symlink",
    "os.truncate",
    "os.utime",
    "os.setxattr",
    "os.removexattr",
    "os.putenv",
    "os.unsetenv",
    "shutil.",
    "socket.",
    "ctypes.",
    "resource.setrlimit",
    "resource.prlimit",
    "webbrowser.open",
)
"""Audit events a worker refuses (an event matches an entry it equals or, for entries ending in a dot,
starts with); opening a file for writing is refused too."""

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_ENV_KEEP = {"PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP", "SYSTEMROOT", "VIRTUAL_ENV"}
_ENV_ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_BOOT = (
    "import json, sys; settings = json.loads(sys.argv[1]); sys.path[:] = settings['path']; "
    "from trgrpo.sandbox import serve; serve(settings)"
)


class JobResult(NamedTuple):
    status: str  # "ok", "error", "timeout" (its own time ran out) or "skipped" (the call's limit came first)
    value: Any  # the function's return value, the error's description, or the seconds allowed
    refused: tuple[str, ...]  # audit events the worker refused while running the job


# --------------------------------------------------------------------------- the worker side


def failures(results: list[JobResult], completions: list[str], checker: str) -> tuple[list[int], str]:
    """Indices of the jobs that did not finish, and a one-line message about the first that failed on its own
    and about those the call's limit stopped (empty if none)."""
    failed = [i for i, r in enumerate(results) if r.status != "ok"]
    own = [i for i in failed if results[i].status != "skipped"]
    said = []
    if own:
        first = results[own[0]]
        what = f"took longer than {first.value}s" if first.status == "timeout" else f"raised {first.value}"
        said.append(f"{checker} {what} on {completions[own[0]][-200:]!r}")
    if len(failed) > len(own):  # not the answers' fault: say so rather than blame the per-answer limit
        said.append(
            f"{len(failed) - len(own)} answers were not (fully) checked: the call's time limit came first"
        )
    return failed, "; ".join(said)


def resolve(path: str) -> Callable:
    """The function named ``"module:qualified.name"``."""
    module, _, name = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when the thread that started it exits (Linux); exit now if the
    trainer is already gone (it died before the request took effect)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


def limit_resources(memory_mb: int) -> None:
    """Address space of ``memory_mb`` MiB (0 = no limit) and no core files."""
    import resource

    if memory_mb:
        limit = int(memory_mb) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def make_audit_hook(refused: list[str]) -> Callable[[str, tuple], None]:
    """An audit hook that refuses ``REFUSED_EVENTS`` and writes, noting each refused event in ``refused``."""
    exact = {e for e in REFUSED_EVENTS if not e.endswith(".")}
    prefixes = tuple(e for e in REFUSED_EVENTS if e.endswith("."))

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            mode, flags = (args + (None, None))[1:3]
            writes = (isinstance(flags, int) and flags & _WRITE_FLAGS) or (
                isinstance(mode, str) and any(c in mode for c in "wax+")
            )
            if not writes:
                return
        elif event not in exact and not event.startswith(prefixes):
            return
        refused.append(event)
        raise PermissionError(f"trgrpo sandbox: {event} is refused in a verifier worker")

    return hook


def _read_exact(stream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            return b""
        data += chunk
    return data


def serve(settings: dict) -> None:
    """Worker main loop: length-prefixed pickled ``(function, args, kwargs)`` in on stdin, one JSON line
    ``[status, value, refused]`` out per job on the original stdout (anything printed goes to stderr)."""
    die_with_parent(settings["parent"])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle; it stops the workers
    limit_resources(settings["memory_mb"])
    jobs, out = os.fdopen(os.dup(0), "rb", buffering=0), os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    for path in settings["preload"]:
        if ":" in path:
            resolve(path)()
        else:
            importlib.import_module(path)
    sys.dont_write_bytecode = True
    refused: list[str] = []
    sys.addaudithook(make_audit_hook(refused))
    out.write('["ready", null, []]\n')
    functions: dict[str, Callable] = {}
    while header := _read_exact(jobs, 4):
        refused.clear()
        try:
            path, args, kwargs = pickle.loads(_read_exact(jobs, struct.unpack(">I", header)[0]))
            fn = functions.get(path) or functions.setdefault(path, resolve(path))
            line = json.dumps(["ok", fn(*args, **kwargs), refused])
        except BaseException as exc:  # noqa: BLE001 - whatever the checked code raises (SystemExit too) is reported
            line = json.dumps(["error", f"{type(exc).__name__}: {exc}"[:1000], refused])
        out.write(line + "\n")


# --------------------------------------------------------------------------- the trainer side

_spawner: tuple[int, ThreadPoolExecutor] | None = None


def _spawn(cmd: list[str], env: dict) -> subprocess.Popen:
    """Start a worker from one long-lived thread: PR_SET_PDEATHSIG fires when the *thread* that started the
    process exits, so a worker started from a reward's short-lived timeout thread would die with it."""
    global _spawner
    if _spawner is None or _spawner[0] != os.getpid():  # a forked trainer process has no spawner thread
        _spawner = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="trgrpo-sandbox-spawn"))
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "bufsize": 0, "close_fds": True}
    return _spawner[1].submit(subprocess.Popen, cmd, env=env, **pipes).result()


def worker_env() -> dict[str, str]:
    """The trainer's environment reduced to what an interpreter needs, one thread per math library."""
    env = {k: v for k, v in os.environ.items() if k in _ENV_KEEP or k.startswith(("LC_", "PYTHON"))}
    return {**env, **_ENV_ONE_THREAD}


class _Worker:
    """One worker process and its pipes; started when first needed, and again after it was killed."""

    def __init__(self, memory_mb: int, preload: Sequence[str], start_timeout: float = 120.0) -> None:
        self.memory_mb, self.preload, self.start_timeout = memory_mb, list(preload), start_timeout
        self.proc: subprocess.Popen | None = None
        self._buffer = b""

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def launch(self) -> None:
        path = [p or os.getcwd() for p in sys.path]
        settings = {"parent": os.getpid(), "memory_mb": self.memory_mb, "preload": self.preload, "path": path}
        self.proc = _spawn([sys.executable, "-c", _BOOT, json.dumps(settings)], worker_env())
        self._buffer = b""

    def wait_ready(self) -> None:
        deadline, reply = time.monotonic() + self.start_timeout, None
        try:
            while reply is None and wait([self.proc.stdout], timeout=max(0.0, deadline - time.monotonic())):
                reply = self.read()
        except (EOFError, OSError):
            reply = None
        if reply is None or reply[0] != "ready":
            self.kill()
            raise RuntimeError(
                f"a sandbox worker did not start (preload {self.preload}, memory_mb "
                f"{self.memory_mb}); its error, if any, is on stderr above"
            )

    def ensure_started(self) -> None:
        if not self.alive:
            self.kill()
            self.launch()
            self.wait_ready()

    @property
    def stdout(self):
        return self.proc.stdout

    def send(self, payload: bytes) -> None:
        self.proc.stdin.write(struct.pack(">I", len(payload)) + payload)

    def read(self) -> list | None:
        """The next reply once a whole line has arrived (call when readable); EOFError if the worker died."""
        chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
        if not chunk:
            raise EOFError("the worker process died")
        self._buffer += chunk
        if b"\n" not in self._buffer:
            return None
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            pipe.close()
        self.proc = None


_local = threading.local()


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Every ``map`` of this thread inside the block stops at ``seconds`` from now (empty or 0 = no limit):
    jobs not finished by then are reported as timed out."""
    previous = getattr(_local, "stop_at", None)
    if seconds:
        stop_at = time.monotonic() + seconds
        _local.stop_at = stop_at if previous is None else min(previous, stop_at)
    try:
        yield
    finally:
        _local.stop_at = previous


_logged: set[str] = set()


class SandboxPool:
    """Worker processes that run jobs, each bounded by ``timeout`` seconds and ``memory_mb`` MiB.

    Args:
        workers: worker processes (jobs of one ``map`` run in parallel).
        timeout: seconds one job may take; its worker is then killed (0 = no limit).
        memory_mb: address-space limit of each worker in MiB (0 = no limit).
        preload: modules (``"module"``) to import and functions (``"module:function"``) to call in each worker
            before it takes jobs, so that the first job does not pay for imports.
    """

    def __init__(
        self,
        workers: int = 1,
        timeout: float = DEFAULT_TIMEOUT,
        memory_mb: int = DEFAULT_MEMORY_MB,
        preload: Sequence[str] = (),
    ) -> None:
        if workers < 1 or timeout < 0 or memory_mb < 0:
            raise ValueError(
                f"sandbox: workers must be >= 1, timeout and memory_mb >= 0, got {workers}, "
                f"{timeout}, {memory_mb}"
            )
        self.timeout = timeout
        self.workers = [_Worker(memory_mb, preload) for _ in range(workers)]
        for worker in self.workers:  # start them side by side: each takes a second or so to import
            worker.launch()
        for worker in self.workers:
            worker.wait_ready()
        self._lock = threading.Lock()

    def map(self, fn: str, jobs: Sequence[tuple[tuple, dict]]) -> list[JobResult]:
        """``fn(*args, **kwargs)`` for each job ``(args, kwargs)``, in the workers; one result per job."""
        with self._lock:
            results = self._map(fn, [pickle.dumps((fn, tuple(a), dict(k))) for a, k in jobs])
        for event in {e for r in results for e in r.refused} - _logged:
            _logged.add(event)
            log.warning(
                "sandbox: refused %s while running %s on model output (a completion tried to run code "
                "or touch files); the check went on without it",
                event,
                fn,
            )
        return results

    def _deadline(self) -> float:
        job = time.monotonic() + self.timeout if self.timeout else float("inf")
        stop_at = getattr(_local, "stop_at", None)
        return job if stop_at is None else min(job, stop_at)

    def _map(self, fn: str, payloads: list[bytes]) -> list[JobResult]:
        results: list[JobResult] = [JobResult("error", "not run", ())] * len(payloads)
        pending, idle = deque(range(len(payloads))), list(self.workers)
        busy: dict[int, tuple[_Worker, float]] = {}  # job index -> (worker, deadline)
        try:
            while pending or busy:
                while idle and pending:
                    worker, i = idle.pop(), pending.popleft()
                    self._send(worker, payloads[i])
                    busy[i] = (worker, self._deadline())
                first = min(deadline for _, deadline in busy.values())
                timeout = None if first == float("inf") else max(0.0, first - time.monotonic())
                ready = wait([w.stdout for w, _ in busy.values()], timeout=timeout)
                for i, (worker, deadline) in list(busy.items()):
                    result = self._collect(worker, deadline, ready)
                    if result is not None:
                        results[i] = result
                        del busy[i]
                        idle.append(worker)
                stop_at = getattr(_local, "stop_at", None)
                if stop_at is not None and time.monotonic() >= stop_at:
                    for i in pending:
                        results[i] = JobResult("skipped", "the call's time limit came first", ())
                    pending.clear()
        finally:  # a job abandoned (a signal, Ctrl-C): its reply would answer the next job
            for worker, _ in busy.values():
                worker.kill()
        return results

    @staticmethod
    def _send(worker: _Worker, payload: bytes) -> None:
        worker.ensure_started()
        try:
            worker.send(payload)
        except OSError:  # it died between jobs
            worker.kill()
            worker.ensure_started()
            worker.send(payload)

    def _collect(self, worker: _Worker, deadline: float, ready) -> JobResult | None:
        """The job's result if it has one now (a reply, a death, or its deadline passed), else None."""
        if worker.stdout in ready:
            try:
                reply = worker.read()
            except (EOFError, OSError):
                code = worker.proc.poll()
                worker.kill()
                return JobResult("error", f"the worker process died (exit status {code})", ())
            if reply is not None:
                return JobResult(reply[0], reply[1], tuple(reply[2]))
        if time.monotonic() >= deadline:
            worker.kill()  # started again when next needed
            stop_at = getattr(_local, "stop_at", None)
            if stop_at is not None and deadline >= stop_at:  # the call's limit came before the job's own
                return JobResult("skipped", "the call's time limit came first", ())
            return JobResult("timeout", self.timeout, ())
        return None

    def close(self) -> None:
        for worker in self.workers:
            worker.kill()


_POOLS: dict[tuple, SandboxPool] = {}


def get_pool(
    workers: int = 1,
    timeout: float = DEFAULT_TIMEOUT,
    memory_mb: int = DEFAULT_MEMORY_MB,
    preload: Sequence[str] = (),
) -> SandboxPool:
    """The process's shared pool for these settings (started on first use, stopped at exit)."""
    key = (os.getpid(), workers, float(timeout), int(memory_mb), tuple(preload))
    if key not in _POOLS:
        _POOLS[key] = SandboxPool(workers, timeout, memory_mb, preload)
    return _POOLS[key]


def function_path(fn: Callable) -> str:
    """``"module:qualified_name"`` of a function a fresh interpreter can import; ValueError otherwise."""
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module or not name or "<" in name or module == "__main__":
        raise ValueError(
            f"{fn!r} cannot be imported by name in a worker process (a module-level function "
            "of an importable module is needed)"
        )
    return f"{module}:{name}"


def call_seconds(jobs: int, workers: int, timeout: float) -> float:
    """The longest a ``map`` of ``jobs`` jobs may take when every job uses its whole ``timeout``: one round
    per ``workers`` jobs, each with time to replace a killed worker (``START_ALLOWANCE``)."""
    rounds = -(-jobs // max(1, workers))  # ceil
    return rounds * (timeout + START_ALLOWANCE)


def runs_in_sandbox(fn: Callable) -> Callable:
    """Mark a reward that does its work in a ``SandboxPool`` (each sample bounded by the pool's timeout):
    ``trgrpo.rewards`` then calls it in the calling thread under ``time_limit`` instead of in a thread.
    Its parameters ``timeout`` (seconds per answer) and ``workers`` set how long a whole call may take
    (``call_seconds``), so that no answer loses its own time to slow neighbours."""
    fn.runs_in_sandbox = True
    return fn


@atexit.register
def close_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
