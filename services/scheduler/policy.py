"""Role policies: plain functions from observed cluster state to role decisions.

The live scheduler and the cluster simulator call the same functions. A policy never does
I/O; it returns `RoleDecision`s that the caller turns into role commands.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from services.scheduler.registry import WorkerState


@dataclass(frozen=True)
class RoleDecision:
    worker_id: str
    from_role: str
    to_role: str
    reason: str


def static_policy(workers: Sequence[WorkerState], layout: Mapping[str, int]) -> list[RoleDecision]:
    """Move workers so role counts match `layout` (role -> count) as closely as possible.

    Workers already in a role that is under its target keep it; surplus workers (sorted by id,
    so the decision is deterministic) fill the roles that are short, in layout order. An empty
    layout keeps every worker's current role. Workers that are switching are left alone.
    """
    if not layout:
        return []
    stable = sorted((w for w in workers if w.state in ("ready", "starting")), key=lambda w: w.worker_id)
    kept: dict[str, int] = {}
    surplus: list[WorkerState] = []
    for w in stable:
        if kept.get(w.role, 0) < layout.get(w.role, 0):
            kept[w.role] = kept.get(w.role, 0) + 1
        else:
            surplus.append(w)
    decisions = []
    for role, target in layout.items():
        while kept.get(role, 0) < target and surplus:
            w = surplus.pop(0)
            decisions.append(RoleDecision(w.worker_id, w.role, role, f"static layout wants {target} {role}"))
            kept[role] = kept.get(role, 0) + 1
    return decisions
