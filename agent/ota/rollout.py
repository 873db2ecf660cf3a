"""Staged rollout: one signed bundle to a set of nodes, canary first, halted on the first failure.

The gateway checks the bundle with the release public key ([updates] release_key) by the
rules `lantern release verify` and the node share (tools/field/release.py, node/update.py),
refuses one that needs a newer gateway, then sends it to the canary nodes, then to the rest
`step` nodes at a time (agent/ota/transfer.py `push` does one node). The first node that rolls
back or refuses halts the rollout: nodes still in flight are stopped and no further node gets
it. The rollout's state and the nodes' firmware versions live in STATE_FILE in the state
directory (JSON, 0600, replaced atomically), the bundle beside it: a restarted gateway resumes
a running rollout, never sending again to a node that is done. docs/rollout.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lantern import __version__

from ..config import UpdatesConfig, write_secret
from ..errors import ConfigError, LanternError

if TYPE_CHECKING:
    from .transfer import Outcome

log = logging.getLogger("lantern.rollout")

NODE_STATES = ("pending", "transferring", "applied", "updated", "rolled_back", "refused",
               "unreachable")
DONE = frozenset({"updated", "rolled_back", "refused", "unreachable"})  # never sent again
FAILED = frozenset({"rolled_back", "refused"})  # halts the rollout
STATES = ("running", "halted", "done")
STATE_FILE = "rollout.json"
BUNDLE_FILE = "rollout.lub"
BUNDLE_MAX = 4 << 20  # a node's whole firmware is a few hundred KiB
REACH_POLL_S = 1.0  # how often a node no link has heard yet is looked for again


class RolloutError(LanternError):
    """A start or halt the gateway refuses; kind: refused (the bundle), busy, idle,
    unconfigured, bad_request. The message says why and what to do."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


Push = Callable[..., Awaitable["Outcome"]]
Reach = Callable[[str], Any]  # node id → the command channel that reaches it, or None


def _version_ok(v: object) -> bool:
    """The node's own rule for a version string (node/update.py)."""
    rules = importlib.import_module("lantern.firmware.node.update")
    return bool(rules.version_ok(v))


def version_key(v: str) -> tuple[Any, ...]:
    """Sort key of a version like 1.4.0, 1.4.0-rc2 or 1.4.0+build: a pre-release sorts before
    its release, build metadata is ignored. ValueError if the release part is not numbers."""
    core = v.partition("+")[0]
    main, dash, pre = core.partition("-")
    nums = tuple(int(x) for x in main.split("."))  # ValueError for "", "a", "1..2"
    nums += (0,) * (3 - len(nums))
    ids = tuple((0, int(x), "") if x.isdigit() else (1, 0, x) for x in pre.split(".")) \
        if dash else ()
    return nums, 0 if dash else 1, ids


@dataclass
class NodeProgress:
    node: str
    state: str = "pending"
    reason: str | None = None
    version: str | None = None  # what the node runs at the end (its outcome's version)
    detail: str = ""  # one line for a person (the transfer's, or ours)
    started: float | None = None
    finished: float | None = None


@dataclass
class Rollout:
    id: str  # the bundle's SHA-256, first 16 hex digits
    version: str
    floor: int
    boards: list[str]
    min_gateway: str
    size: int
    canary: list[str]
    step: int
    nodes: list[NodeProgress]
    state: str = "running"
    reason: str | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # node → why it is no target

    def steps(self) -> list[list[NodeProgress]]:
        """The canary, then the rest `step` at a time."""
        first = [p for p in self.nodes if p.node in self.canary]
        rest = [p for p in self.nodes if p.node not in self.canary]
        return ([first] if first else []) + [rest[i:i + self.step]
                                             for i in range(0, len(rest), self.step)]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["counts"] = {s: sum(p.state == s for p in self.nodes) for s in NODE_STATES}
        d["halted"] = self.state == "halted"
        steps = self.steps()
        now = next((i for i, g in enumerate(steps) if any(p.state not in DONE for p in g)),
                   len(steps))
        d["step_now"], d["steps"] = now, len(steps)
        d["phase"] = ("canary" if self.canary and now == 0 else "done" if now == len(steps)
                      else "steps")
        return d

    @classmethod
    def from_dict(cls, d: Any) -> Rollout:
        """A rollout read back from STATE_FILE; ValueError naming the first field that is
        not what this gateway writes (a hand edit, another version's file)."""
        if not isinstance(d, dict) or not isinstance(d.get("nodes"), list):
            raise ValueError("not a rollout (no list of nodes)")
        _check("rollout", d, _ROLLOUT_RULES)
        for p in d["nodes"]:
            if not isinstance(p, dict):
                raise ValueError("rollout.nodes: an entry that is not a map")
            _check(f"rollout.nodes[{p.get('node')!r}]", p, _NODE_RULES)
        ids = [p["node"] for p in d["nodes"]]
        if len(set(ids)) != len(ids):
            raise ValueError("rollout.nodes: a node listed twice")
        try:
            nodes = [NodeProgress(**p) for p in d["nodes"]]
            keep = {k: d[k] for k in cls.__dataclass_fields__ if k in d and k != "nodes"}
            return cls(nodes=nodes, **keep)
        except TypeError as e:  # a field missing, or one NodeProgress has not
            raise ValueError(f"not a rollout ({e})") from None


Rule = Callable[[Any], bool]


def _check(where: str, d: dict[str, Any], rules: dict[str, Rule]) -> None:
    for k, ok in rules.items():
        if k in d and not ok(d[k]):
            raise ValueError(f"{where}.{k}: {json.dumps(d[k])[:60]} is not what the gateway "
                             "writes there")


def _whole(lo: int, hi: int) -> Rule:
    return lambda v: type(v) is int and lo <= v <= hi


def _maybe(rule: Rule) -> Rule:
    return lambda v: v is None or rule(v)


def _text(v: Any) -> bool:
    return isinstance(v, str)


def _texts(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _time(v: Any) -> bool:
    return type(v) in (int, float) and v >= 0


# what `Rollout` and `NodeProgress` hold, as `start` and `_one` write them
_ROLLOUT_RULES: dict[str, Rule] = {
    "id": lambda v: isinstance(v, str) and len(v) == 16 and all(c in "0123456789abcdef"
                                                                 for c in v),
    "version": lambda v: _version_ok(v), "floor": _whole(0, 2**64 - 1),
    "boards": _texts, "min_gateway": lambda v: _version_ok(v), "size": _whole(1, BUNDLE_MAX),
    "canary": _texts, "step": _whole(1, 1000), "state": lambda v: v in STATES,
    "reason": _maybe(_text), "created": _time, "finished": _maybe(_time),
    "skipped": lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
}
_NODE_RULES: dict[str, Rule] = {
    "node": lambda v: isinstance(v, str) and v != "", "state": lambda v: v in NODE_STATES,
    "reason": _maybe(_text), "version": _maybe(lambda v: _version_ok(v)), "detail": _text,
    "started": _maybe(_time), "finished": _maybe(_time),
}


class RolloutManager:
    """Runs at most one rollout at a time and remembers the nodes' firmware versions."""

    def __init__(self, state_dir: Path, cfg: UpdatesConfig | None, reach: Reach,
                 targets: Callable[[], Sequence[str]], push: Push | None = None,
                 gateway_version: str = __version__) -> None:
        self.state_dir = state_dir
        self.cfg = cfg
        self._reach = reach
        self._targets = targets
        self._push = push  # None: agent/ota/transfer.py's, loaded by the first rollout
        self.gateway_version = gateway_version
        self.rollout: Rollout | None = None
        # node → the version it last reported; one dict for the life of the manager (the
        # sinks that send it upstream hold it)
        self.firmware: dict[str, str] = {}
        self.boards: dict[str, str] = {}  # node → its board, from its STATUS
        self.refused: Counter[str] = Counter()  # bundles the gateway refused, by reason
        self._task: asyncio.Task[None] | None = None
        self._save_lock = asyncio.Lock()
        self._start_lock = asyncio.Lock()
        self._later: set[asyncio.Task[None]] = set()

    # ---- life cycle

    async def __aenter__(self) -> RolloutManager:
        await asyncio.to_thread(self._load)
        r = self.rollout
        if r is not None and r.state == "running":
            bundle = await asyncio.to_thread(self._read_bundle, r)
            if self.cfg is None:
                await self._halt_now(r, "the gateway restarted without [updates]; start the "
                                     "rollout again once it is configured")
            elif bundle is None:
                await self._halt_now(r, f"the bundle ({BUNDLE_FILE}) is gone or differs "
                                     "from the one started; start the rollout again")
            else:
                done = sum(p.state in DONE for p in r.nodes)
                log.info("rollout %s of %s resumed after a restart: %d of %d nodes done",
                         r.id, r.version, done, len(r.nodes))
                self._launch(r, bundle)
        return self

    async def stop(self) -> None:
        """Stop sending (the gateway stops): nodes in flight go back to pending, to be
        resumed by the next start. Call it before the links stop, so that no node is taken
        for unreachable because its link went away under it."""
        await self._stop_task()

    async def __aexit__(self, *exc: object) -> None:
        await self._stop_task()
        for t in list(self._later):
            await t
        await self._save()

    def _load(self) -> None:
        path = self.state_dir / STATE_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as e:  # never guess about a rollout: a node done must stay done
            raise ConfigError(f"{path}: cannot read the rollout's state ({e.strerror}); check "
                              "the state directory's owner and mode") from None
        try:
            d = json.loads(raw)
            if not isinstance(d, dict):
                raise ValueError("not a map of rollout and nodes")
            known = d.get("nodes") or {}
            if not isinstance(known, dict) or not all(isinstance(v, dict)
                                                      for v in known.values()):
                raise ValueError("nodes: not a map of node to {fw, board}")
            self.rollout = Rollout.from_dict(d["rollout"]) if d.get("rollout") else None
            # updated in place: the sinks hold this very dict (gateway.py); by learn's rules
            for n, v in known.items():
                self._learn_firmware(n, v.get("fw"), v.get("board"))
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            # not ours to delete: kept aside for whoever wants to look, and said once
            bad = path.with_name(path.name + ".unreadable")
            try:
                os.replace(path, bad)
            except OSError as err:
                raise ConfigError(f"{path}: unreadable ({e}) and cannot be moved aside "
                                  f"({err.strerror}); move it away by hand") from None
            log.error("rollout: %s is unreadable (%s); moved to %s, starting without a "
                      "rollout", path, e, bad.name)
            self.rollout = None
            self.firmware.clear()
            self.boards.clear()

    def _read_bundle(self, r: Rollout) -> bytes | None:
        try:
            data = (self.state_dir / BUNDLE_FILE).read_bytes()
        except OSError:
            return None
        return data if hashlib.sha256(data).hexdigest()[:16] == r.id else None

    async def _save(self) -> None:
        async with self._save_lock:
            nodes = {n: {"fw": self.firmware.get(n), "board": self.boards.get(n)}
                     for n in sorted(set(self.firmware) | set(self.boards))}
            doc = {"rollout": asdict(self.rollout) if self.rollout else None, "nodes": nodes}
            data = json.dumps(doc, indent=1, sort_keys=True).encode()
            try:
                await asyncio.to_thread(write_secret, self.state_dir / STATE_FILE, data)
            except OSError as e:  # a full disk must not stop the rollout's own halt
                log.error("rollout: cannot write %s (%s); the state is kept in memory",
                          STATE_FILE, e.strerror)

    def _save_soon(self) -> None:
        """Save from a synchronous caller (a link learning a version)."""
        t = asyncio.get_running_loop().create_task(self._save())
        self._later.add(t)
        t.add_done_callback(self._later.discard)

    # ---- what the nodes report

    def learn(self, node: str, fw: object = None, board: object = None,
              upd: object = None) -> None:
        """A node's STATUS (identity or OP_STATUS reply): its firmware, board and update
        state. Called by whatever receives STATUS frames; bad values are ignored."""
        changed = self._learn_firmware(node, fw, board)
        r = self.rollout
        if (isinstance(upd, dict) and upd.get("state") == "candidate" and r is not None
                and r.state == "running"):
            for p in r.nodes:
                if p.node == node and p.state == "transferring":
                    p.state, changed = "applied", True
        if changed:
            self._save_soon()

    def _learn_firmware(self, node: str, fw: object, board: object) -> bool:
        """Keep what matches the node's own rules; True if something changed."""
        changed = False
        if _version_ok(fw) and self.firmware.get(node) != fw:
            self.firmware[node] = str(fw)
            changed = True
        if isinstance(board, str) and 0 < len(board) <= 32 and self.boards.get(node) != board:
            self.boards[node] = board
            changed = True
        return changed

    # ---- operator actions

    async def start(self, bundle: bytes, canary: int | Sequence[str] | None = None,
                    step: int | None = None, nodes: Sequence[str] | None = None) -> Rollout:
        """Check the bundle and start sending it; RolloutError if refused."""
        async with self._start_lock:  # two POSTs at once: the second finds the first running
            return await self._start(bundle, canary, step, nodes)

    async def _start(self, bundle: bytes, canary: int | Sequence[str] | None,
                     step: int | None, nodes: Sequence[str] | None) -> Rollout:
        cfg = self.cfg
        if cfg is None:
            raise RolloutError("unconfigured", "this gateway has no [updates] section: add "
                               "one with release_key (docs/rollout.md)")
        if self.rollout is not None and self.rollout.state == "running":
            raise RolloutError("busy", f"rollout {self.rollout.id} of "
                               f"{self.rollout.version} is running; halt it first")
        man = await asyncio.to_thread(self._verify, bundle, cfg.release_key)
        known = list(dict.fromkeys(self._targets()))
        for n in nodes or ():
            if n not in known:
                raise RolloutError("bad_request", f"node {n!r}: no key for it on this gateway")
        chosen = [n for n in known if n in nodes] if nodes else known
        skipped = {n: f"board {self.boards[n]} is not one of the bundle's" for n in chosen
                   if n in self.boards and self.boards[n] not in man.boards}
        targets = [n for n in chosen if n not in skipped]
        if not targets:
            raise RolloutError("bad_request", "no node to update"
                               + (f" (skipped: {skipped})" if skipped else ""))
        canary = cfg.canary if canary is None else canary
        if isinstance(canary, int):
            first = targets[:canary]
        else:
            first = list(dict.fromkeys(canary))
            for n in first:
                if n not in targets:
                    raise RolloutError("bad_request", f"canary {n!r} is not one of the "
                                       f"rollout's nodes ({', '.join(targets)})")
        step = cfg.step if step is None else step
        if not 1 <= step <= 1000:
            raise RolloutError("bad_request", f"step {step}: must be 1..1000")
        order = first + [n for n in targets if n not in first]
        progress = [NodeProgress(n) for n in order]
        for p in progress:
            if self.firmware.get(p.node) == man.version:
                p.state, p.reason, p.version = "updated", "already runs it", man.version
        r = Rollout(hashlib.sha256(bundle).hexdigest()[:16], man.version, man.floor,
                    list(man.boards), man.min_gateway, len(bundle), first, step, progress,
                    skipped=skipped)
        try:
            await asyncio.to_thread(write_secret, self.state_dir / BUNDLE_FILE, bundle)
        except OSError as e:
            raise RolloutError("refused", f"cannot keep the bundle in {self.state_dir}: "
                               f"{e.strerror}") from None
        self.rollout = r
        await self._save()
        log.info("rollout %s of %s started: %d nodes, canary %s, then %d at a time",
                 r.id, r.version, len(order), ", ".join(first) or "none", step)
        self._launch(r, bundle)
        return r

    async def halt(self, reason: str = "halted by the operator") -> Rollout:
        r = self.rollout
        if r is None or r.state != "running":
            raise RolloutError("idle", "no rollout is running")
        await self._stop_task()
        await self._halt_now(r, reason)
        return r

    def _verify(self, bundle: bytes, key: Path) -> Any:
        """The bundle's manifest, or RolloutError(refused) with the reason, counted."""
        from lantern.tools.field.release import (
            BundleRefused,
            ReleaseError,
            load_public,
            open_bundle,
        )

        def refuse(reason: str, detail: str) -> RolloutError:
            self.refused[reason] += 1
            log.warning("rollout: bundle refused: %s: %s (counted in "
                        "lantern_update_bundles_refused_total)", reason, detail)
            return RolloutError("refused", f"bundle refused: {reason}: {detail}")

        if len(bundle) > BUNDLE_MAX:
            raise refuse("too_large", f"{len(bundle)} bytes, at most {BUNDLE_MAX}")
        try:
            man, _ = open_bundle(bundle, load_public(key))
        except BundleRefused as e:
            raise refuse(e.reason, str(e).partition(": ")[2]) from None
        except ReleaseError as e:
            raise RolloutError("unconfigured", f"[updates] release_key: {e}") from None
        try:
            too_old = version_key(man.min_gateway) > version_key(self.gateway_version)
        except ValueError:
            raise refuse("gateway_version", f"minimum gateway {man.min_gateway!r} is not a "
                         "version this gateway can compare") from None
        if too_old:
            raise refuse("gateway_version", f"release {man.version} needs gateway "
                         f"{man.min_gateway} or newer; this one is {self.gateway_version}")
        return man

    # ---- the rollout itself

    def _launch(self, r: Rollout, bundle: bytes) -> None:
        self._task = asyncio.create_task(self._run(r, bundle), name=f"rollout-{r.id}")

    async def _stop_task(self) -> None:
        t, self._task = self._task, None
        if t is not None and t is not asyncio.current_task():
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def _halt_now(self, r: Rollout, reason: str) -> None:
        r.state, r.reason, r.finished = "halted", reason, time.time()
        log.warning("rollout %s of %s HALTED: %s; no further node gets it", r.id, r.version,
                    reason)
        await self._save()

    async def _run(self, r: Rollout, bundle: bytes) -> None:
        try:
            for i, group in enumerate(r.steps()):
                todo = [p for p in group if p.state not in DONE]
                if todo:
                    failure = await self._step(r, bundle, todo)
                    if failure:
                        await self._halt_now(r, failure)
                        return
                if i == 0 and r.canary and not any(p.state == "updated" for p in group):
                    await self._halt_now(r, "no canary node could be reached, so nothing "
                                         "proved the release; check the canaries' links")
                    return
            r.state, r.finished = "done", time.time()
            log.info("rollout %s of %s done: %s", r.id, r.version,
                     {s: n for s, n in r.as_dict()["counts"].items() if n})
            await self._save()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug of ours: the rollout stops, says why, sends nothing
            log.error("rollout %s: internal error %r; halting it", r.id, e, exc_info=e)
            await self._halt_now(r, f"internal error in the gateway: {e!r}")

    async def _step(self, r: Rollout, bundle: bytes, todo: list[NodeProgress]) -> str | None:
        """Send to every node of a step at once; the first failure stops the others."""
        tasks = {asyncio.create_task(self._one(bundle, p)): p for p in todo}
        pending = set(tasks)
        failure = None
        try:
            while pending and failure is None:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    p = tasks[t]
                    if p.state in FAILED and failure is None:
                        failure = (f"{'canary ' if p.node in r.canary else ''}{p.node} "
                                   f"{p.state.replace('_', ' ')}: "
                                   f"{p.detail or p.reason or 'no reason given'}")
        finally:
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        return failure

    async def _one(self, bundle: bytes, p: NodeProgress) -> None:
        assert self.cfg is not None
        timeout = self.cfg.node_timeout_s
        deadline = time.monotonic() + timeout
        p.state, p.reason, p.detail = "transferring", None, ""
        p.started, p.finished = time.time(), None
        await self._save()
        try:
            channel = self._reach(p.node)
            while channel is None and time.monotonic() < deadline:
                await asyncio.sleep(REACH_POLL_S)
                channel = self._reach(p.node)
            if channel is None:
                p.state, p.reason = "unreachable", f"no link heard the node in {timeout:g} s"
            else:
                if self._push is None:  # imported here: an idle gateway never sends one
                    from .transfer import push as transfer_push

                    self._push = transfer_push
                out = await asyncio.wait_for(self._push(channel, p.node, bundle),
                                             max(0.0, deadline - time.monotonic()))
                p.state = out.status if out.status in DONE else "refused"
                p.reason = out.reason if out.status in DONE else "unknown_outcome"
                p.detail = str(getattr(out, "detail", "") or "")
                if _version_ok(out.version):
                    p.version = self.firmware[p.node] = str(out.version)
                elif out.version is not None:  # a node's word, from a STATUS: not kept
                    log.warning("rollout: %s reported firmware %r, not a version (the node's "
                                "own version rule); ignored", p.node, str(out.version)[:40])
        except asyncio.CancelledError:
            p.state, p.reason = "pending", "interrupted before an outcome"
            raise
        except TimeoutError:
            p.state, p.reason = "unreachable", f"no outcome within {timeout:g} s"
        except Exception as e:  # the link failed under the transfer: this node only
            p.state, p.reason = "unreachable", f"transfer failed: {e!r}"
            log.warning("rollout: %s: transfer failed: %r", p.node, e)
        p.finished = time.time()
        log.info("rollout: %s %s%s", p.node, p.state,
                 f" ({p.detail or p.reason})" if p.detail or p.reason else "")
        await self._save()

    # ---- what the API, metrics and page show

    def status(self) -> dict[str, Any]:
        return {
            "configured": self.cfg is not None,
            "gateway_version": self.gateway_version,
            "rollout": self.rollout.as_dict() if self.rollout else None,
            "firmware": {n: {"version": self.firmware.get(n), "board": self.boards.get(n)}
                         for n in sorted(set(self.firmware) | set(self.boards))},
            "bundles_refused": dict(self.refused),
        }
