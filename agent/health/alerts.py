"""Health conditions: each raised once after `confirm` bad samples, cleared once after `clear`
good ones, and counted; what the detectors report, and what operators receive."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

# alertname → (severity, what it means: the annotation's description)
RULES: dict[str, tuple[str, str]] = {
    "LampDarkAtNight": ("critical", "the lamp draws no power although it is dark: a broken "
                        "lamp, driver or fuse"),
    "LampDayBurner": ("warning", "the lamp burns in full daylight: a stuck photocell or "
                      "controller, pure waste"),
    "LampCycling": ("warning", "the lamp switches on and off again and again: a failing lamp "
                    "or driver"),
    "LampPowerOffRating": ("warning", "the burning lamp draws power far from its rating and "
                           "its dim levels: a degraded or wrong lamp"),
    "SensorStuck": ("warning", "a measurement repeats exactly for longer than its sensor's "
                    "noise allows: a frozen sensor"),
    "SensorOutOfRange": ("warning", "a measurement outside what the physical world allows"),
    "SensorNotAnswering": ("warning", "the node's driver reports the sensor failed or absent"),
    "NodeSilent": ("critical", "no pack from the node for several of its intervals"),
    "NodeBatteryLow": ("warning", "the node's backup cell is low (or the node says it saves "
                       "power)"),
    "NodeOutboxGrowing": ("warning", "frames pile up on the node unacknowledged: link trouble"),
}
LAMP_ALERTS = ("LampDarkAtNight", "LampDayBurner", "LampCycling", "LampPowerOffRating")

Key = tuple[str, str, str]  # (alertname, node, subject: a measurement or "")


def fingerprint(key: Key) -> str:
    return hashlib.sha256("\x00".join(key).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Event:
    """A condition raised (status "firing") or cleared ("resolved")."""

    alert: str
    node: str
    subject: str
    status: str
    starts_at: float  # the first bad sample of the streak that raised it
    ends_at: float | None  # the sample that cleared it
    at: float  # the sample that decided it
    summary: str

    @property
    def key(self) -> Key:
        return (self.alert, self.node, self.subject)

    @property
    def severity(self) -> str:
        return RULES[self.alert][0]

    def labels(self) -> dict[str, str]:
        out = {"alertname": self.alert, "node": self.node, "severity": self.severity,
               "service": "lantern"}
        if self.subject:
            out["measurement"] = self.subject
        return out


@dataclass
class Open:
    starts_at: float
    summary: str


@dataclass
class _Streak:
    bad: int = 0
    good: int = 0
    first_bad: float = 0.0


class Conditions:
    """Open conditions, their streaks and the raised/cleared counts (the durable part is
    `open` and the counts: `state()` / `restore()`)."""

    def __init__(self) -> None:
        self.open: dict[Key, Open] = {}
        self.raised: Counter[str] = Counter()
        self.cleared: Counter[str] = Counter()
        self._streaks: dict[Key, _Streak] = {}

    def observe(self, key: Key, bad: bool | None, t: float, summary: str = "",
                confirm: int = 3, clear: int = 3) -> Event | None:
        """One sample's verdict on a condition (None: this sample says nothing about it)."""
        if bad is None:
            return None
        s = self._streaks.get(key)
        if s is None:
            if not bad and key not in self.open:
                return None  # healthy and never seen bad: nothing to remember
            s = self._streaks[key] = _Streak()
        if bad:
            if s.bad == 0:
                s.first_bad = t
            s.bad += 1
            s.good = 0
            if key in self.open:
                return None
            if s.bad >= confirm:
                self.open[key] = Open(s.first_bad, summary)
                self.raised[key[0]] += 1
                return Event(*key, "firing", s.first_bad, None, t, summary)
            return None
        s.good += 1
        s.bad = 0
        if key not in self.open:
            del self._streaks[key]
            return None
        if s.good >= clear:
            o = self.open.pop(key)
            del self._streaks[key]
            self.cleared[key[0]] += 1
            return Event(*key, "resolved", o.starts_at, t, t, o.summary)
        return None

    def is_open(self, alert: str, node: str, subject: str = "") -> bool:
        return (alert, node, subject) in self.open

    def of_node(self, node: str) -> list[str]:
        return sorted(a for a, n, _ in self.open if n == node)

    def state(self) -> dict[str, Any]:
        return {"open": [[*k, o.starts_at, o.summary] for k, o in sorted(self.open.items())],
                "raised": dict(self.raised), "cleared": dict(self.cleared)}

    def restore(self, state: dict[str, Any]) -> None:
        self.open = {(a, n, s): Open(float(t), str(summary))
                     for a, n, s, t, summary in state.get("open", ())}
        self.raised = Counter(state.get("raised", {}))
        self.cleared = Counter(state.get("cleared", {}))
        self._streaks = {}  # streaks start anew: an open condition needs `clear` fresh samples
