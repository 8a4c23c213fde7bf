"""The worker registry: who is alive, in which role, with how much room. Pure, no I/O.

The scheduler service feeds it heartbeats and asks it, once per interval, which workers have
gone silent. The same object runs inside the cluster simulator.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class WorkerState:
    worker_id: str
    role: str
    state: str
    last_seen: float
    seq: int
    pid: int = 0
    free_blocks: int = 0
    total_blocks: int = 0
    queue_depth: int = 0
    running: int = 0
    step_time_ms: float = 0.0
    capacity: int = 0


class WorkerRegistry:
    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.workers: dict[str, WorkerState] = {}

    def observe(self, hb, now: float) -> bool:
        """Record a heartbeat. Returns False (and changes nothing) for a stale/reordered one."""
        cur = self.workers.get(hb.worker_id)
        # A restarted worker keeps its id but starts a new pid with seq from 0.
        if cur is not None and hb.pid == cur.pid and hb.seq <= cur.seq:
            return False
        self.workers[hb.worker_id] = WorkerState(
            worker_id=hb.worker_id, role=hb.role, state=hb.state, last_seen=now, seq=hb.seq, pid=hb.pid,
            free_blocks=hb.free_blocks, total_blocks=hb.total_blocks, queue_depth=hb.queue_depth,
            running=hb.running, step_time_ms=hb.step_time_ms, capacity=hb.capacity)
        return True

    def expire(self, now: float) -> list[WorkerState]:
        """Remove and return workers silent for longer than the timeout."""
        dead = [w for w in self.workers.values() if now - w.last_seen > self.timeout_s]
        for w in dead:
            del self.workers[w.worker_id]
        return dead

    def remove(self, worker_id: str) -> None:
        self.workers.pop(worker_id, None)

    def by_role(self) -> dict[str, list[WorkerState]]:
        out: dict[str, list[WorkerState]] = {}
        for w in sorted(self.workers.values(), key=lambda w: w.worker_id):
            out.setdefault(w.role, []).append(w)
        return out
