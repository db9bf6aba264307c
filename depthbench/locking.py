"""A lock on one cache entry that works across processes and hosts sharing a file system.

Cells of a sweep run at the same time (joblib workers, submitit/SLURM jobs on other nodes) and share
one cache directory. The first cell to need an entry (calibration statistics and stored activations
of one model on one calibration set, one base-model result) takes its lock and computes it; the
others wait, then read what it published.

Primitive: ``mkdir`` of ``<entry>.lock`` (atomic and exclusive on local file systems and on NFS v3/v4,
unlike ``O_EXCL`` on old NFS v2 clients). The holder writes ``owner.json`` (host, pid, a random token,
heartbeat time) inside it and a daemon thread rewrites it every ``heartbeat_s`` seconds (temporary
file + rename). A lock is stale when its heartbeat is older than ``stale_after_s``; a waiter then
takes it over. No process table is consulted across hosts; only when the owner's host is this host
and its pid no longer exists is the lock taken over at once (a shortcut, not needed for correctness).
Taking over is serialised by a second ``mkdir`` lock (``<entry>.lock.break``), so two waiters cannot
both break the same lock and then each other's fresh one.

Limits, stated: heartbeats compare the holder's clock with the waiter's, so hosts' clocks must agree
to well within ``stale_after_s`` (NTP); NFS attribute caching (close-to-open consistency) delays what
a waiter sees by up to the client's ``acregmax`` (60 s by default), which ``stale_after_s`` (default
300 s) must exceed; a holder frozen for longer than ``stale_after_s`` (SIGSTOP, a suspended VM) loses
its lock and the entry may be computed twice. That is wasted work, never a wrong result: entries are
published by atomic rename, so readers see a complete entry or none, and the lock only decides who
computes. A breaker killed between its two ``mkdir``s leaves ``.lock.break``, removed when older than
``stale_after_s``.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

OWNER_FILE = "owner.json"
#: Default seconds without a heartbeat after which a lock is taken over.
STALE_AFTER_S = 300.0


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    token: str
    heartbeat: float

    def describe(self, now: float | None = None) -> str:
        return f"{self.host}:{self.pid} (heartbeat {max(0.0, (now or time.time()) - self.heartbeat):.0f} s ago)"


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class EntryLock:
    """``with EntryLock(path, what=...) as lock:`` computes an entry alone. ``lock.took_over`` is the
    `Owner` whose stale lock was broken to get in (its half-written files may be cleaned), else None."""

    def __init__(self, path: str | os.PathLike, what: str = "cache entry", stale_after_s: float = STALE_AFTER_S,
                 heartbeat_s: float | None = None, poll_s: float = 0.5, log_every_s: float = 60.0):
        if stale_after_s <= 0:
            raise ValueError(f"stale_after_s={stale_after_s}; allowed: > 0 seconds")
        self.path = Path(path)
        self.what = what
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else max(0.05, min(10.0, stale_after_s / 6))
        self.poll_s = poll_s
        self.log_every_s = log_every_s
        self.token = secrets.token_hex(8)
        self.took_over: Owner | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- owner file --------------------------------------------------------------------------
    def _write_owner(self) -> None:
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token, "heartbeat": time.time()}
        tmp = self.path / f".{OWNER_FILE}.{self.token}.tmp"
        tmp.write_text(json.dumps(owner))
        os.replace(tmp, self.path / OWNER_FILE)

    def owner(self) -> Owner | None:
        """The current holder, or None (no lock, or a lock whose owner file is not written yet)."""
        try:
            data = json.loads((self.path / OWNER_FILE).read_text())
            return Owner(str(data["host"]), int(data["pid"]), str(data["token"]), float(data["heartbeat"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def held(self) -> bool:
        """Whether some process holds this lock now (it exists and is not stale)."""
        return self.path.is_dir() and not self._stale(self.owner(), time.time())

    def _stale(self, owner: Owner | None, now: float) -> bool:
        if owner is None:  # created but owner file never written (killed in between): judge by the dir's age
            try:
                return now - self.path.stat().st_mtime > self.stale_after_s
            except FileNotFoundError:
                return False
        if owner.host == socket.gethostname() and _pid_gone(owner.pid):
            return True
        return now - owner.heartbeat > self.stale_after_s

    # -- acquire / release -------------------------------------------------------------------
    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.path.mkdir()
        except FileExistsError:
            return False
        self._write_owner()
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat {self.path.name}", daemon=True)
        self._thread.start()
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._write_owner()
            except OSError as err:  # the lock was taken over or the disk is gone: stop claiming it
                log.warning("lost lock %s (%s)", self.path, err)
                return

    def _break(self, seen: Owner | None) -> bool:
        """Remove the stale lock held by ``seen`` (re-checked under the break lock)."""
        breaker = self.path.with_name(self.path.name + ".break")
        try:
            breaker.mkdir()
        except FileExistsError:
            try:
                if time.time() - breaker.stat().st_mtime > self.stale_after_s:
                    breaker.rmdir()
            except OSError:
                pass
            return False
        try:
            current = self.owner()
            if current != seen or not self._stale(current, time.time()):
                return False
            graveyard = self.path.with_name(f"{self.path.name}.stale.{self.token}")
            try:
                os.rename(self.path, graveyard)
            except FileNotFoundError:
                return False
            shutil.rmtree(graveyard, ignore_errors=True)
            self.took_over = seen
            log.warning("took over the stale lock on %s held by %s", self.what,
                        seen.describe() if seen else "a writer that never wrote its owner file")
            return True
        finally:
            breaker.rmdir()

    def acquire(self, timeout_s: float | None = None) -> None:
        """Block until this process holds the lock, taking over a stale one; logs while it waits."""
        started = last_log = time.time()
        logged = False
        while not self.try_acquire():
            now = time.time()
            owner = self.owner()
            if self._stale(owner, now) and self._break(owner):
                continue
            if not logged or now - last_log >= self.log_every_s:
                log.info("waiting for %s, being computed by %s (%.0f s so far)", self.what,
                         owner.describe(now) if owner else "another process", now - started)
                logged, last_log = True, now
            if timeout_s is not None and now - started > timeout_s:
                raise TimeoutError(f"{self.what}: lock {self.path} still held after {timeout_s} s")
            time.sleep(self.poll_s)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.owner() is not None and self.owner().token != self.token:
            return  # taken over while we were frozen: the lock is someone else's now
        graveyard = self.path.with_name(f"{self.path.name}.done.{self.token}")
        try:
            os.rename(self.path, graveyard)
        except FileNotFoundError:
            return
        shutil.rmtree(graveyard, ignore_errors=True)

    def __enter__(self) -> "EntryLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
