"""One run at a time per output folder: a lock file created atomically, taken over when stale.

On a local disk the lock is created with O_CREAT|O_EXCL, so of two runs that
start together exactly one gets it; the other is refused with a message that
names the holder.  A lock left by a process that died (same host, pid gone, or
the pid now belongs to a process that started later) is stale and is taken
over.  Object stores (gs://, s3://) have no atomic create through Beam's
FileSystems: there the lock object is checked, written and read back, which
catches runs started one after the other but not two started in the same
instant (README.md, Output).

``filelock`` waits for a lock and knows nothing of who holds it; a run must be
refused at once with the holder named, hence this small module.
"""
from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import socket
import sys
import uuid
from typing import Any, Dict, Optional

from apache_beam.io.filesystems import FileSystems

_LOG = logging.getLogger(__name__)

LOCK_NAME = "_PAIRCURATE_LOCK"


class LockError(RuntimeError):
    """The folder is held by another run (the message names it and what to do)."""


def _process_start(pid: int) -> Optional[str]:
    """The start time of a process, in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read().decode("ascii", "replace")
        return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    except (OverflowError, ValueError):
        return False
    return True


def lock_info(command: str) -> Dict[str, Any]:
    """What a lock records: who holds it, since when, doing what."""
    pid = os.getpid()
    return {"pid": pid, "pid_start": _process_start(pid), "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command, "token": uuid.uuid4().hex}


def is_stale(info: Dict[str, Any]) -> bool:
    """True when the holder is known to be gone: same host, and its pid is dead or reused."""
    if info.get("host") != socket.gethostname():
        return False  # another machine's process cannot be checked from here
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if not _pid_alive(pid):
        return True
    recorded, current = info.get("pid_start"), _process_start(pid)
    return recorded is not None and current is not None and recorded != current


def describe(info: Dict[str, Any]) -> str:
    return (f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}, "
            f"command: {info.get('command')}")


def _read(path: str) -> Optional[Dict[str, Any]]:
    """The lock's content; None when it is gone; {} when it cannot be parsed (being written, or damaged)."""
    try:
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            data = handle.read()
    except Exception:  # noqa: BLE001 - gone between the check and the read, on any filesystem
        return None if not FileSystems.exists(path) else {}
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


class OutputLock:
    """The claim of one run on one output folder; ``release()`` ends it."""

    def __init__(self, root: str, info: Dict[str, Any]):
        self.root = root
        self.path = FileSystems.join(root, LOCK_NAME)
        self.info = info

    @classmethod
    def acquire(cls, root: str, command: Optional[str] = None) -> "OutputLock":
        """Take the folder's lock, or raise LockError naming the run that holds it."""
        lock = cls(root, lock_info(command if command is not None else " ".join(sys.argv)))
        if "://" in root:
            lock._acquire_object_store()
        else:
            os.makedirs(root, exist_ok=True)
            lock._acquire_local()
        return lock

    def _refuse(self, holder: Dict[str, Any]) -> LockError:
        who = describe(holder) if holder else "a run whose lock file cannot be read"
        return LockError(f"{self.root} is in use by another paircurate run ({who}); wait for it to end, "
                         f"or, if it is no longer running, delete {self.path}")

    def _acquire_local(self) -> None:
        payload = json.dumps(self.info, sort_keys=True).encode("utf-8")
        for _ in range(5):  # a few rounds: another run may take over the same stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                if holder is None:
                    continue  # released meanwhile: try again
                if not holder or not is_stale(holder):
                    raise self._refuse(holder) from None
                self._take_over(holder)
                continue
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            return
        raise LockError(f"could not take the lock {self.path}: other runs keep taking it")

    def _take_over(self, stale: Dict[str, Any]) -> None:
        """Move a stale lock aside; if what was moved is not the lock judged stale, put it back."""
        aside = f"{self.path}.stale-{self.info['token']}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another run moved it first
        if _read(aside) != stale:  # a fresh lock taken meanwhile: not ours to remove
            try:
                os.link(aside, self.path)  # fails if yet another lock exists: leave that one
            except OSError as exc:
                if exc.errno != errno.EEXIST:
                    raise
            os.unlink(aside)
            return
        os.unlink(aside)
        _LOG.warning("took over the stale lock %s left by a run that is gone (%s)",
                     self.path, describe(stale))

    def _acquire_object_store(self) -> None:
        holder = _read(self.path)
        if holder is not None:
            if holder and is_stale(holder):
                _LOG.warning("took over the stale lock %s left by a run that is gone (%s)",
                             self.path, describe(holder))
            else:
                raise self._refuse(holder)
        handle = FileSystems.create(self.path)
        try:
            handle.write(json.dumps(self.info, sort_keys=True).encode("utf-8"))
        finally:
            handle.close()
        written = _read(self.path)
        if not written or written.get("token") != self.info["token"]:
            raise self._refuse(written or {})

    def release(self) -> None:
        """Remove the lock if it is still ours (never another run's)."""
        holder = _read(self.path)
        if holder and holder.get("token") == self.info["token"]:
            FileSystems.delete([self.path])

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
