"""Counters the gateway keeps; exported by the local API (and logged in summaries)."""

from __future__ import annotations

from collections import Counter


class Metrics:
    def __init__(self) -> None:
        self.frames_received: Counter[str] = Counter()  # by node
        self.frames_rejected: Counter[str] = Counter()  # by reason
        self.duplicates: Counter[str] = Counter()  # by node
        self.readings_stored = 0
        self.readings_delivered = 0
        self.acks_sent = 0
        self.commits = 0
        self.store_errors = 0
        self.upstream_failures = 0
        self.dead_letters = 0

    def snapshot(self) -> dict[str, object]:
        return {
            "frames_received": dict(self.frames_received),
            "frames_rejected": dict(self.frames_rejected),
            "duplicates": dict(self.duplicates),
            "readings_stored": self.readings_stored,
            "readings_delivered": self.readings_delivered,
            "acks_sent": self.acks_sent,
            "commits": self.commits,
            "store_errors": self.store_errors,
            "upstream_failures": self.upstream_failures,
            "dead_letters": self.dead_letters,
        }
