"""The run directory: one process at a time (an advisory lock), and what may change when a run resumes.

``WorkdirLock`` holds ``<workdir>/.lock`` with ``fcntl.flock`` for the life of the run and writes the holder's
PID, host and start time into it. A second process on the same workdir fails at once with ``WorkdirBusyError``
naming the holder. The kernel drops the lock when its holder dies (even by ``kill -9``), so a stale lock needs
no cleanup. On a filesystem without ``flock`` the file's contents are the lock: a holder on this host whose PID
is gone is stale and taken over with a warning; a holder on another host is trusted.

``config_changes(saved, current)`` compares two whole configs (the one the checkpoint was saved with, the one
asked for now) and sorts every difference into *operational* (bookkeeping that cannot change what the run
computes: logging, eval and checkpoint cadence, the mesh) and *altering* (anything else: the data, the optimizer,
the batch, the number of steps, which sets the learning-rate schedule). The trainer resumes through operational
changes, refuses altering ones unless told to accept them, and records both in ``metrics.jsonl``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time

log = logging.getLogger("sqattn.train")

LOCK_NAME = ".lock"

# Config keys (dotted) whose change cannot alter the numbers a run computes. A prefix ending in "." covers
# a whole section. Everything else alters the run.
OPERATIONAL = ("name", "log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints",
               "mesh.", "optim.grad_accum")


class WorkdirError(OSError):
    """The workdir cannot be used (not a directory, not writable)."""


class WorkdirBusyError(RuntimeError):
    """Another live process holds the workdir."""


class ConfigChangeError(ValueError):
    """A resumed run asks for a config that would change what the run computes."""


# ----------------------------------------------------------------------------------------------- workdir
def prepare(workdir: str) -> str:
    """Checks ``workdir`` is a usable directory path, creates it, and returns it unchanged.

    Raises:
      WorkdirError: empty path, a path that exists and is not a directory, or one that cannot be created.
    """
    if not workdir or not str(workdir).strip():
        raise WorkdirError("workdir is empty: pass --workdir=DIR (a run's outputs and checkpoints go there)")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"workdir {workdir!r} exists and is not a directory")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"cannot create workdir {workdir!r}: {e.strerror or e}") from e
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise WorkdirError(f"workdir {workdir!r} is not writable")
    return workdir


def write_json_atomic(path: str, obj) -> None:
    """Writes ``obj`` as JSON to ``path`` through a temporary file and a rename (never half-written)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # exists, owned by someone else
        return True
    return True


class WorkdirLock:
    """An advisory lock on a workdir, held from ``acquire`` until ``release`` or process exit."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_NAME)
        self._fd: int | None = None
        self._pidfile = False

    def _holder(self) -> dict:
        try:
            with open(self.path) as f:
                return json.loads(f.read() or "{}")
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _describe(h: dict) -> str:
        if not h:
            return "another process (no holder recorded)"
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h.get("started", 0)))
        return f"pid {h.get('pid')} on host {h.get('host')!r} (since {started})"

    def _busy(self, holder: dict) -> WorkdirBusyError:
        return WorkdirBusyError(
            f"workdir {os.path.dirname(self.path)!r} is in use by {self._describe(holder)}. Stop that run "
            f"or use another --workdir (two runs on one workdir would overwrite each other's checkpoints).")

    def _record(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.write(self._fd, json.dumps(me).encode())
        os.fsync(self._fd)

    def acquire(self) -> "WorkdirLock":
        import fcntl
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._busy(self._holder()) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            self._pidfile = True          # no flock here: the file's contents are the lock
            holder = self._holder()
            if holder and holder.get("pid") != os.getpid():
                same_host = holder.get("host") == socket.gethostname()
                if not same_host or _pid_alive(int(holder.get("pid", -1))):
                    os.close(fd)
                    raise self._busy(holder) from None
                log.warning("taking over a stale workdir lock from %s (that process is gone)",
                            self._describe(holder))
        self._fd = fd
        self._record()
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if self._pidfile:
                os.ftruncate(self._fd, 0)
            else:
                import fcntl
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


# ----------------------------------------------------------------------------------------------- config
def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def is_operational(key: str) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in OPERATIONAL)


def config_changes(saved: dict, current: dict, defaults: dict | None = None) -> tuple[dict, dict]:
    """(operational, altering) differences between two config JSONs: ``{key: [saved, current]}``.

    A key either side lacks takes its value from ``defaults`` (a setting added to sqattn after the run was
    saved, or after the config that the current one was built from, e.g. another run's config.json, was
    written); otherwise a key present on one side only counts as a change (``None`` for the missing side).
    """
    a, b = flatten(saved), flatten(current)
    for key, val in flatten(defaults or {}).items():
        a.setdefault(key, val)
        b.setdefault(key, val)
    operational, altering = {}, {}
    for key in sorted(set(a) | set(b)):
        old, new = a.get(key), b.get(key)
        if old != new:
            (operational if is_operational(key) else altering)[key] = [old, new]
    return operational, altering


def format_changes(changes: dict) -> str:
    return "\n".join(f"  {k}: {json.dumps(v[0])} -> {json.dumps(v[1])}" for k, v in changes.items())
