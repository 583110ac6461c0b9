"""Stopping what a test started, and nothing else: a process group and the descendants of its leader.

Ray puts each worker in a process group of its own, so killing the group of ``ray start --block`` alone would
leave the workers it spawned; they are found by walking ``/proc`` from the leader before anything is killed,
and each is known by its process id and start time, so a process id reused meanwhile is never signalled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def _processes() -> dict[int, tuple[int, int, int]]:
    """Process id -> (parent process id, process group, start time in clock ticks) for every live process here."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended while we looked
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # fields from the third (state) on
        if fields[0] != "Z":  # a zombie has ended; only its parent's wait is missing
            found[int(entry.name)] = (int(fields[1]), int(fields[2]), int(fields[19]))
    return found


def descendants(pid: int) -> dict[int, int]:
    """Every process started, directly or not, by ``pid``: process id -> start time."""
    processes = _processes()
    children: dict[int, list[int]] = {}
    for child, (parent, _, _) in processes.items():
        children.setdefault(parent, []).append(child)
    found, queue = {}, [pid]
    while queue:
        for child in children.get(queue.pop(0), []):
            found[child] = processes[child][2]
            queue.append(child)
    return found


def _ours(tree: dict[int, int], proc: subprocess.Popen) -> tuple[set[int], bool]:
    """The processes of ``tree`` still alive, and whether the group ``proc`` leads is still ours.

    The group is ours while its leader is not yet reaped or any process is still in it: an id in use as a
    process group is not given to a new process, so the group cannot be someone else's.
    """
    alive = _processes()
    ours = {pid for pid, started in tree.items() if pid in alive and alive[pid][2] == started}
    return ours, proc.poll() is None or any(group == proc.pid for _, group, _ in alive.values())


def _signal(tree: dict[int, int], proc: subprocess.Popen, sig: signal.Signals) -> None:
    """``sig`` to the processes of ``tree`` still alive and to the group ``proc`` leads while it is ours."""
    ours, group = _ours(tree, proc)
    for pid in ours:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    if group:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass


def stop_process_tree(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """Stop ``proc`` (started with ``start_new_session=True``), its process group and its descendants.

    SIGTERM to ``proc`` alone first (``ray start --block`` then stops the processes it started, in order), and
    SIGKILL for whatever of its group and descendants is left once they are all gone or ``grace_s`` has passed.
    """
    tree = descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        ours, group = _ours(tree, proc)
        if not ours and not group:
            break
        time.sleep(0.2)
    kill_process_tree(proc, tree)


def kill_process_tree(proc: subprocess.Popen, tree: dict[int, int] | None = None) -> None:
    """SIGKILL ``proc``'s process group and every process it spawned (``tree``, or found now): no clean-up."""
    _signal(descendants(proc.pid) if tree is None else tree, proc, signal.SIGKILL)
    proc.wait(timeout=60)
