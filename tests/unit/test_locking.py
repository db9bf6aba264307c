"""The cache-entry lock across processes: mutual exclusion, heartbeats, stale-lock takeover."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import pytest

from depthbench.locking import OWNER_FILE, EntryLock


def _hold(path, log_file, hold_s):
    with EntryLock(path, stale_after_s=30, poll_s=0.01):
        start = time.time()
        time.sleep(hold_s)
        with open(log_file, "a") as f:
            f.write(f"{start} {time.time()}\n")


def test_processes_take_the_lock_one_at_a_time(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    log_file = tmp_path / "intervals"
    procs = [ctx.Process(target=_hold, args=(tmp_path / "e.lock", log_file, 0.3)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    intervals = sorted(tuple(map(float, line.split())) for line in log_file.read_text().splitlines())
    assert len(intervals) == 3
    for (_, end), (start, _) in zip(intervals, intervals[1:]):
        assert start >= end, intervals  # no two holders at once
    assert not (tmp_path / "e.lock").exists()


def _fake_lock(path, host, pid, heartbeat):
    path.mkdir()
    (path / OWNER_FILE).write_text(json.dumps({"host": host, "pid": pid, "token": "x", "heartbeat": heartbeat}))


def test_lock_of_another_host_without_heartbeat_is_taken_over(tmp_path):
    path = tmp_path / "e.lock"
    _fake_lock(path, "node-that-died", 4242, time.time() - 100)
    lock = EntryLock(path, stale_after_s=10)
    lock.acquire(timeout_s=5)
    assert lock.took_over is not None and lock.took_over.host == "node-that-died" and lock.took_over.pid == 4242
    assert lock.owner().host == socket.gethostname() and lock.owner().pid == os.getpid()
    lock.release()
    assert not path.exists() and not list(tmp_path.iterdir())


def test_lock_of_another_host_with_fresh_heartbeat_is_respected(tmp_path):
    path = tmp_path / "e.lock"
    _fake_lock(path, "busy-node", 4242, time.time())  # another host: its pid means nothing here
    with pytest.raises(TimeoutError, match="still held"):
        EntryLock(path, stale_after_s=30, poll_s=0.05).acquire(timeout_s=0.5)
    assert json.loads((path / OWNER_FILE).read_text())["host"] == "busy-node"


def test_lock_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path = tmp_path / "e.lock"
    _fake_lock(path, socket.gethostname(), int(dead.stdout), time.time())
    lock = EntryLock(path, stale_after_s=3600)
    lock.acquire(timeout_s=2)
    assert lock.took_over.pid == int(dead.stdout)
    lock.release()


def test_a_lock_directory_without_owner_file_is_stale_only_when_old(tmp_path):
    path = tmp_path / "e.lock"
    path.mkdir()  # a holder killed between mkdir and writing its owner file
    with pytest.raises(TimeoutError):
        EntryLock(path, stale_after_s=30, poll_s=0.05).acquire(timeout_s=0.3)
    old = time.time() - 100
    os.utime(path, (old, old))
    lock = EntryLock(path, stale_after_s=30)
    lock.acquire(timeout_s=2)
    assert lock.took_over is None and lock.owner().pid == os.getpid()
    lock.release()


def test_heartbeat_keeps_a_long_holder_from_being_taken_over(tmp_path):
    path = tmp_path / "e.lock"
    holder = EntryLock(path, stale_after_s=0.6, heartbeat_s=0.1)
    holder.acquire()
    try:
        time.sleep(1.5)  # far longer than stale_after_s: only the heartbeat keeps it fresh
        # a waiter from "another host" must judge by the heartbeat alone
        owner = json.loads((path / OWNER_FILE).read_text())
        assert time.time() - owner["heartbeat"] < 0.6
        with pytest.raises(TimeoutError):
            EntryLock(path, stale_after_s=0.6, poll_s=0.05).acquire(timeout_s=1.0)
    finally:
        holder.release()
    assert not path.exists()


def test_bad_stale_timeout_is_refused(tmp_path):
    with pytest.raises(ValueError, match="stale_after_s=0"):
        EntryLock(tmp_path / "e.lock", stale_after_s=0)


@pytest.mark.parametrize("holder_alive", [True, False])
def test_ended_multirun_keeps_stores_while_a_pass_lock_is_held(tmp_path, holder_alive):
    from omegaconf import OmegaConf

    from depthbench.experiments.sweep_callbacks import DropStoredActivations

    statistics = tmp_path / "sweep" / ".cache" / "statistics"
    store = statistics / "activations-abc"
    store.mkdir(parents=True)
    (store / "residual_0.bin").write_bytes(b"\0" * 1000)
    # a pass of another multirun on this sweep directory, on another node: alive or long dead
    _fake_lock(statistics / ".pass-abc.lock", "node3", 17, time.time() - (0 if holder_alive else 1000))
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}}, "cache": {}})
    DropStoredActivations().on_multirun_end(config)
    assert store.exists() == holder_alive
