"""One writer at a time per run folder, evaluation output and audit folder.

Two commands writing the same output would interleave their files (a run.json of one method beside the
weights of another). A command therefore holds a lock file while it writes: `<folder>/.gmr.lock` for a
run or audit folder (`lock_folder`), `.<name>.lock` beside an evaluation record (`lock_file`). A second
writer gets `LockHeld` (a ValueError: exit code 2) naming the holder: pid, host, command and since when.

A lock left behind by a killed process is stale and is taken over with a warning: on the same host when
its process is gone (pid not running, a zombie, or a reused pid with another start time); from another
host (a shared file system) when its holder has not refreshed it for `FOREIGN_STALE_SECONDS`: a live
holder touches its lock every `HEARTBEAT_SECONDS` from a background thread.

Hand-written rather than `filelock`: its kernel locks (fcntl) record no holder to name and are not
reliable on the network file systems of clusters, and its marker files record no command or start time
(and none at all before filelock 3.22, which torch's unpinned dependency allows). Exclusive creation
(O_CREAT | O_EXCL) is atomic on local and NFS file systems; taking over a stale lock happens under a
second exclusive file, so two processes cannot both break and then both take one lock.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
from pathlib import Path

LOCK_NAME = ".gmr.lock"
HEARTBEAT_SECONDS = 60.0
FOREIGN_STALE_SECONDS = 2 * 3600.0    # generous: clock skew between hosts, a suspended job
UNREADABLE_GRACE_SECONDS = 60.0       # a lock file whose holder may still be writing its record
_ATTEMPTS = 5

log = logging.getLogger("gmr")


class LockHeld(ValueError):
    """Another live process writes the same output; the message names it and the way out."""


def lock_folder(folder: str | os.PathLike) -> "Lock":
    """The lock of a run or audit folder (the folder must exist)."""
    folder = Path(folder)
    return Lock(folder / LOCK_NAME, folder)


def lock_file(path: str | os.PathLike) -> "Lock":
    """The lock of one output file (an evaluation record with its .npz and AutoAttack state files)."""
    path = Path(path)
    return Lock(path.parent / f".{path.name}.lock", path)


def _cannot_lock(path: Path, err: OSError) -> OSError:
    """A full disk as DiskFullError (one line, exit 1); other errors as they are."""
    from .io import disk_full, full_error

    return full_error(path) if disk_full(err, path.parent) else err


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of a process from /proc, or None without /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return fields[0], fields[19]


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return False
    return True


def holder_identity() -> dict:
    """Who this process is, as a lock records it."""
    stat = _proc_stat(os.getpid())
    argv = [Path(sys.argv[0]).name] + sys.argv[1:] if sys.argv and sys.argv[0] else ["python"]
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": shlex.join(argv)[:300],
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "boot_id": _boot_id(),
            "start_ticks": stat[1] if stat else None}


def stale_reason(holder: dict | None, age: float) -> str | None:
    """Why the lock of `holder` (its record; None: unreadable) whose file was last touched `age`
    seconds ago is stale, or None when its holder may still be writing."""
    if holder is None:
        return None if age < UNREADABLE_GRACE_SECONDS else "its record is unreadable"
    if holder.get("host") != socket.gethostname():
        if age > FOREIGN_STALE_SECONDS:
            return f"not refreshed for {age / 3600:.1f} h"
        return None
    if holder.get("boot_id") and _boot_id() and holder["boot_id"] != _boot_id():
        return "the host has restarted since"
    pid = holder.get("pid")
    if not isinstance(pid, int) or not _pid_running(pid):
        return "its process is gone"
    stat = _proc_stat(pid)
    if stat is not None and stat[0] in ("Z", "X"):
        return "its process is gone"
    if stat is not None and holder.get("start_ticks") not in (None, stat[1]):
        return "its process is gone (the pid now belongs to another process)"
    return None


def describe(holder: dict | None) -> str:
    if holder is None:
        return "a process that has not finished writing its lock record"
    return (f"pid {holder.get('pid')} on {holder.get('host')} ({holder.get('command')}) "
            f"since {holder.get('since')}")


def _read(path: Path) -> tuple[bytes | None, dict | None, float]:
    """(raw bytes, parsed record or None, age in seconds) of a lock file; raw None when it is gone."""
    try:
        raw = path.read_bytes()
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None, None, 0.0
    try:
        record = json.loads(raw)
    except ValueError:
        record = None
    return raw, record if isinstance(record, dict) else None, age


class Lock:
    """An exclusive lock file held while a command writes `target`; use as a context manager."""

    def __init__(self, path: Path, target: Path):
        self.path, self.target = Path(path), Path(target)
        self._raw: bytes | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Lock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        raw = json.dumps(holder_identity()).encode()
        for _ in range(_ATTEMPTS):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                self._clear_if_stale()
                continue
            except OSError as err:
                raise _cannot_lock(self.path, err) from None
            try:
                os.write(fd, raw)
            except OSError as err:
                self.path.unlink(missing_ok=True)
                raise _cannot_lock(self.path, err) from None
            finally:
                os.close(fd)
            self._raw = raw
            self._thread = threading.Thread(target=self._heartbeat, name="gmr-lock-heartbeat", daemon=True)
            self._thread.start()
            return
        raise LockHeld(f"{self.target} is being written by {describe(_read(self.path)[1])}; "
                       f"try again once it has finished")

    def _clear_if_stale(self) -> None:
        """Remove the lock file when its holder is gone (warning); raise LockHeld when it is alive."""
        raw, holder, age = _read(self.path)
        if raw is None:  # released meanwhile
            return
        reason = stale_reason(holder, age)
        if reason is None:
            hint = (f"if that process no longer runs, delete {self.path}"
                    if holder is None or holder.get("host") != socket.gethostname() else "wait for it to finish")
            raise LockHeld(f"{self.target} is being written by {describe(holder)}; {hint}")
        breaker = self.path.with_name(self.path.name + ".break")
        try:
            fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:  # another process is taking it over; clear a breaker left by a crash
            if _read(breaker)[2] > UNREADABLE_GRACE_SECONDS:
                breaker.unlink(missing_ok=True)
            time.sleep(0.05)
            return
        os.close(fd)
        try:
            if _read(self.path)[0] == raw:  # still the stale holder's file, not a new holder's
                self.path.unlink()
                log.warning(f"gmr: taking over the stale lock {self.path} of {describe(holder)}: {reason}")
        finally:
            breaker.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        """Stop refreshing and remove the lock file if it is still this process's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._raw is not None and _read(self.path)[0] == self._raw:
            self.path.unlink(missing_ok=True)
        self._raw, self._thread = None, None
        self._stop = threading.Event()
