"""The global KV block index: which worker (and tier) holds which prefix block. Pure, no I/O.

Blocks are named by their chained content hash, so the same prefix has the same name on every
worker. Fed by `KVEvent`s; a worker that dies is dropped whole.
"""

from __future__ import annotations

from collections.abc import Iterable


class BlockIndex:
    def __init__(self) -> None:
        self._holders: dict[str, dict[str, str]] = {}  # block hash -> {worker_id: tier}
        self._by_worker: dict[str, set[str]] = {}  # worker_id -> block hashes

    def apply(self, worker_id: str, kind: str, block_hashes: Iterable[str], tier: str) -> None:
        """Apply one event: 'stored' adds, 'removed' drops these blocks, 'cleared' drops all."""
        if kind == "cleared":
            self.drop_worker(worker_id)
            return
        owned = self._by_worker.setdefault(worker_id, set())
        for h in block_hashes:
            if kind == "stored":
                self._holders.setdefault(h, {})[worker_id] = tier
                owned.add(h)
            elif kind == "removed":
                holders = self._holders.get(h)
                if holders is not None:
                    holders.pop(worker_id, None)
                    if not holders:
                        del self._holders[h]
                owned.discard(h)
            else:
                raise ValueError(f"kind: unknown KV event kind {kind!r}")

    def drop_worker(self, worker_id: str) -> int:
        """Forget everything a worker held; returns how many blocks it held."""
        owned = self._by_worker.pop(worker_id, set())
        for h in owned:
            holders = self._holders.get(h)
            if holders is not None:
                holders.pop(worker_id, None)
                if not holders:
                    del self._holders[h]
        return len(owned)

    def holders(self, block_hash: str) -> dict[str, str]:
        return dict(self._holders.get(block_hash, {}))

    def longest_prefix(self, block_hashes: list[str]) -> dict[str, int]:
        """For each worker: how many leading blocks of this chain it holds."""
        out: dict[str, int] = {}
        alive: set[str] | None = None
        for i, h in enumerate(block_hashes):
            here = set(self._holders.get(h, {}))
            alive = here if alive is None else alive & here
            if not alive:
                break
            for w in alive:
                out[w] = i + 1
        return out

    def __len__(self) -> int:
        return len(self._holders)

    def workers(self) -> list[str]:
        return sorted(self._by_worker)
