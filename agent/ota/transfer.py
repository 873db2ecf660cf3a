"""One bundle to one node over its command channel: OFFER, CHUNKs, APPLY, then its verdict.

The wire is docs/protocol.md ("Diagnostics", ops 9-12); docs/updates-gateway.md says how the
gateway uses it. The node decides everything that matters (signature, board, floor, space,
each file's hash): the gateway only carries bytes and reads the answer.

- OFFER sends the bundle's head (8 bytes and the COSE_Sign1); the node answers with `have`,
  the file bytes it already holds for this very bundle, so a transfer cut by a link loss or
  a power cut goes on from there.
- CHUNKs follow from `have`, at most `window` unanswered at once. A chunk the node did not
  take (one before it was lost) is answered with the node's `have`, and the gateway sends
  again from there.
- APPLY, then the node reboots into the candidate; it is kept only if it proves itself.
  `push` asks for the node's STATUS until its `upd` state says "confirmed" or "rolled_back".

Chunks ride behind ACKs on every link (agent/links/), and the window bounds what a node
spends on them between its own DATA frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import cbor2

from ..nodecmd import (
    E_REFUSED,
    OK,
    OP_STATUS,
    OP_UPDATE_APPLY,
    OP_UPDATE_CHUNK,
    OP_UPDATE_OFFER,
    CommandError,
)

log = logging.getLogger("lantern.ota")

Status = Literal["updated", "rolled_back", "refused", "unreachable"]
STATUSES: tuple[Status, ...] = ("updated", "rolled_back", "refused", "unreachable")
MAGIC = b"LUB1"
HEAD_LEN = 8
CHUNK_LIMIT = 768  # what one COMMAND frame carries with room to spare (1024 bytes a frame)
HEAD_PIECE = 512  # head bytes per OFFER piece: the node holds the head while it verifies it
FILE_FAILURES = 2  # a file that fails its hash this often is the bundle's fault, not the line's
IDLE_ROUNDS = 5  # rounds in a row in which the node comes no further: the push ends
BACKOFF_MAX = 30.0


@dataclass(frozen=True)
class Outcome:
    """How one node's update ended.

    status: "updated" (runs `version` and confirmed it), "rolled_back" (the node went back by
    itself; `reason` is its own, e.g. "boot_exception: ..." or "no_ack"), "refused" (the node
    or the gateway would not take the bundle; `reason` is the node's code, e.g. "signature",
    "board", "floor", "space", "version", "busy", "file"), "unreachable" (no answer in time;
    `reason` "link", "no_progress" or "no_confirmation"). version: the firmware the node
    runs at the end,
    if it said. detail: one line for a person.
    """

    node: str
    status: Status
    reason: str | None = None
    version: str | None = None
    detail: str = ""


@dataclass
class TransferStats:
    """Plain counters of a transfer, or of many (pass one object to several `push`es)."""

    offers: int = 0
    chunks_sent: int = 0
    chunks_resent: int = 0  # sent again from the node's `have`
    bytes_sent: int = 0  # file bytes in CHUNK commands, resent ones included
    resumes: int = 0  # transfers taken up again after a link loss or timeout
    stalls: int = 0  # rounds that ended with the node holding no more than before
    backoff_s: float = 0.0  # time spent waiting between rounds
    refusals: Counter[str] = field(default_factory=Counter)  # by the node's reason
    outcomes: Counter[str] = field(default_factory=Counter)  # by Outcome.status


class CommandChannel(Protocol):
    """What `push` needs of a link's channel (agent/nodecmd.py Channel)."""

    async def command(self, node_id: str, op: int, args: dict[int, Any] | None = None,
                      timeout: float = 5.0, *, retries: int = 2) -> tuple[int, Any]: ...


@dataclass(frozen=True)
class Bundle:
    head: bytes  # magic, length and COSE_Sign1: what OFFER carries
    files: bytes  # the file area: what CHUNKs carry
    version: str | None  # from the manifest (read, not verified: the node verifies)


def split(bundle: bytes) -> Bundle:
    """A bundle's head and file area; ValueError if it is not laid out as one."""
    if len(bundle) < HEAD_LEN or bundle[:4] != MAGIC:
        raise ValueError("not a Lantern update bundle (no LUB1 magic)")
    n = int.from_bytes(bundle[4:8], "big")
    if len(bundle) < HEAD_LEN + n:
        raise ValueError(f"envelope cut at {len(bundle) - HEAD_LEN} of {n} bytes")
    version = None
    try:
        env = cbor2.loads(bundle[HEAD_LEN:HEAD_LEN + n])
        manifest = cbor2.loads(env.value[2])
        v = manifest.get(2)
        version = v if isinstance(v, str) else None
    except Exception:  # only for reporting: the node judges the envelope
        version = None
    return Bundle(bundle[:HEAD_LEN + n], bundle[HEAD_LEN + n:], version)


class _Refused(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class _Stuck(Exception):
    """The node answers but comes no further: IDLE_ROUNDS rounds, or give_up_s."""


@dataclass
class _Rounds:
    """The rounds of one push: where the node got to, and the backoff between rounds.

    A round ends when the gateway must start over from the node's `have`: a CHUNK answered
    from elsewhere, an OFFER forgotten (no_offer), an APPLY that finds the slot incomplete,
    a lost link. A node that answers every time and never comes further would otherwise
    be sent the same bytes at once and forever, until the rollout's node_timeout_s."""

    node: str
    give_up: float  # monotonic: no round starts after this
    first_delay: float
    st: TransferStats
    delay: float = 0.0
    seen: int = -1  # the most file bytes the node said it holds, in this push
    mark: int = -1  # `seen` when the last round ended
    idle: int = 0  # rounds in a row that ended at `mark`
    last_error: str = ""  # the last link error, for the outcome

    def saw(self, have: int) -> None:
        if self.mark < 0:  # the node's first `have`: where this push starts from
            self.mark = have
        self.seen = max(self.seen, have)

    async def end(self, why: str) -> None:
        """A round ended (why: the node's answer). No wait if the node came further; else
        back off, and _Stuck after IDLE_ROUNDS such rounds in a row or past give_up."""
        if self.seen > self.mark:
            self.mark, self.idle, self.delay = self.seen, 0, self.first_delay
            return
        self.idle += 1
        self.st.stalls += 1
        at = f"at {max(self.seen, 0)} file bytes"
        if self.idle >= IDLE_ROUNDS:
            raise _Stuck(f"node {self.node}: no progress in {self.idle} rounds {at} "
                         f"(last: {why})")
        await self.wait(f"no progress {at} ({why})")

    async def wait(self, why: str) -> None:
        """Back off before the next round; _Stuck if that would pass give_up."""
        self.delay = self.delay or self.first_delay
        if time.monotonic() + self.delay > self.give_up:
            raise _Stuck(f"node {self.node}: gave up ({why})")
        log.info("node %s: %s; again in %.1f s", self.node, why, self.delay)
        self.st.backoff_s += self.delay
        await asyncio.sleep(self.delay)
        self.delay = min(self.delay * 2, BACKOFF_MAX)


def _refusal(node: str, op: int, code: int, result: Any) -> _Refused:
    if code == E_REFUSED and isinstance(result, dict):
        reason, detail = str(result.get(1, "refused")), str(result.get(2, ""))
        return _Refused(reason, f"node {node}: {reason}: {detail}" if detail else
                        f"node {node}: {reason}")
    if code == 1:
        return _Refused("unsupported", f"node {node} does not know op {op}: its firmware "
                        "predates updates over the air; update it by cable once")
    text = result.get("error") if isinstance(result, dict) else result
    return _Refused(f"code_{code}", f"node {node}: op {op} answered code {code}: {text}")


async def push(channel: CommandChannel, node_id: str, bundle: bytes, *, window: int = 4,
               timeout: float = 5.0, offer_timeout: float = 60.0, give_up_s: float = 3600.0,
               confirm_s: float = 900.0, poll_s: float = 2.0, backoff_s: float = 0.5,
               stats: TransferStats | None = None) -> Outcome:
    """Carry `bundle` to `node_id` and wait for its verdict; never raises for the node's sake.

    offer_timeout: a node checks the signature before it answers an OFFER (about 2 s on a
    Cortex-M3). give_up_s: how long link losses and rounds without progress may go on before
    the node is "unreachable". confirm_s: how long after APPLY the candidate may take to prove
    itself. backoff_s: the first wait between rounds (doubling up to 30 s).
    """
    st = stats if stats is not None else TransferStats()
    rounds = _Rounds(node_id, time.monotonic() + give_up_s, backoff_s, st)
    out = await _push(channel, node_id, bundle, max(1, min(window, 4)), timeout, offer_timeout,
                      rounds, confirm_s, poll_s, st)
    st.outcomes[out.status] += 1
    log.info("node %s: update %s%s", node_id, out.status,
             f" ({out.detail})" if out.detail else "")
    return out


async def _push(ch: CommandChannel, node: str, bundle: bytes, window: int, timeout: float,
                offer_timeout: float, rounds: _Rounds, confirm_s: float, poll_s: float,
                st: TransferStats) -> Outcome:
    try:
        b = split(bundle)
    except ValueError as e:
        return Outcome(node, "refused", "format", None, f"gateway: {e}")
    try:
        if not await _rounds(ch, node, b, window, timeout, offer_timeout, rounds, st):
            return Outcome(node, "unreachable", "link", None, rounds.last_error)
    except _Refused as r:
        return Outcome(node, "refused", r.reason, None, r.detail)
    except _Stuck as e:
        return Outcome(node, "unreachable", "no_progress", None, str(e))
    return await _verdict(ch, node, b.version, timeout, confirm_s, poll_s)


async def _rounds(ch: CommandChannel, node: str, b: Bundle, window: int, timeout: float,
                  offer_timeout: float, rounds: _Rounds, st: TransferStats) -> bool:
    """Rounds of OFFER, CHUNKs and APPLY until APPLY was sent: True, or False when link
    losses outlast give_up. Raises _Refused (the node's final word) or _Stuck."""
    file_failures = 0
    while True:
        try:
            await _transfer(ch, node, b, window, timeout, offer_timeout, st, rounds)
            try:
                # Sent once, never retried by the channel: the node may act on an APPLY whose
                # answer is lost (it resets once its REPLY is queued). A retried APPLY would
                # meet the candidate, hear "incomplete" and send the bundle again, without end
                # if each answer is lost. Unanswered, the verdict reads the node's STATUS (and
                # applies once more if the node is still staging).
                code, res = await ch.command(node, OP_UPDATE_APPLY, {}, timeout, retries=0)
            except CommandError as e:
                log.info("node %s: no answer to APPLY (%s); asking for its state", node, e)
                return True
            if code != OK:
                raise _refusal(node, OP_UPDATE_APPLY, code, res)
            return True
        except _Refused as r:
            st.refusals[r.reason] += 1
            if r.reason == "file":
                file_failures += 1
                if file_failures < FILE_FAILURES:
                    continue  # resent from the file's start, after a new OFFER
            if r.reason not in ("no_offer", "incomplete"):
                raise
            # the node forgot the offer (it rebooted) or its slot lacks bytes: offer again,
            # at once if it came further since, else after a backoff, and not for ever
            st.resumes += 1
            await rounds.end(r.reason)
        except CommandError as e:
            rounds.last_error = str(e)
            st.resumes += 1
            try:
                await rounds.wait(f"transfer interrupted ({e})")
            except _Stuck:
                return False


async def _offer(ch: CommandChannel, node: str, head: bytes, timeout: float,
                 offer_timeout: float) -> Any:
    """Send the head in pieces that fit a frame ({1: piece, 2: offset}); the node verifies
    it once complete (that answer may take seconds) and says {1: have, 2: total, 3: max}."""
    at = 0
    for _ in range(4 * (len(head) // HEAD_PIECE + 1)):  # a node that loses pieces over and over
        piece = head[at:at + HEAD_PIECE]
        last = at + len(piece) >= len(head)
        code, res = await ch.command(node, OP_UPDATE_OFFER, {1: piece, 2: at},
                                     offer_timeout if last else timeout)
        if code != OK:
            raise _refusal(node, OP_UPDATE_OFFER, code, res)
        if isinstance(res, dict) and 1 not in res and type(res.get(4)) is int:
            # still incomplete: the node says how much of the head it holds
            held = res[4]
            at = held if 0 < held < len(head) else 0
            continue
        return res
    raise CommandError(node, OP_UPDATE_OFFER, "the head did not arrive whole (pieces lost)")


async def _transfer(ch: CommandChannel, node: str, b: Bundle, window: int, timeout: float,
                    offer_timeout: float, st: TransferStats, rounds: _Rounds) -> None:
    """OFFER, then CHUNKs from the node's `have` until it holds every file byte."""
    st.offers += 1
    res = await _offer(ch, node, b.head, timeout, offer_timeout)
    if not isinstance(res, dict) or not all(type(res.get(k)) is int for k in (1, 2, 3)):
        raise _Refused("reply", f"node {node}: OFFER answer is not {{1: have, 2: total, "
                       f"3: chunk_max}}: {res!r}")
    have, total, chunk_max = res[1], res[2], res[3]
    if total != len(b.files) or not 0 <= have <= total or chunk_max < 1:
        raise _Refused("reply", f"node {node}: counts {have}/{total} bytes for a file area "
                       f"of {len(b.files)}")
    rounds.saw(have)
    size = min(chunk_max, CHUNK_LIMIT)
    sent_up_to = have  # everything below was sent at least once (a resend is counted)
    nxt = have
    inflight: deque[tuple[int, int, asyncio.Task[tuple[int, Any]]]] = deque()
    try:
        while have < total:
            while len(inflight) < window and nxt < total:
                data = b.files[nxt:nxt + size]
                task = asyncio.create_task(ch.command(node, OP_UPDATE_CHUNK,
                                                      {1: nxt, 2: data}, timeout))
                inflight.append((nxt, len(data), task))
                st.chunks_sent += 1
                st.bytes_sent += len(data)
                if nxt < sent_up_to:
                    st.chunks_resent += 1
                nxt += len(data)
                sent_up_to = max(sent_up_to, nxt)
            off, n, task = inflight.popleft()
            code, res = await task
            if code == E_REFUSED:
                r = _refusal(node, OP_UPDATE_CHUNK, code, res)
                raise r
            if code != OK or not isinstance(res, dict) or type(res.get(1)) is not int:
                raise _refusal(node, OP_UPDATE_CHUNK, code, res)
            if res[1] == off + n:
                have = res[1]
                rounds.saw(have)
                continue
            # the node is elsewhere (a chunk before this one was lost): the chunks behind
            # this one were not written either; their answers say where it is
            have = res[1]
            for _, _, t in inflight:
                try:
                    c, r2 = await t
                    if c == OK and isinstance(r2, dict) and type(r2.get(1)) is int:
                        have = r2[1]
                except CommandError:
                    pass
            inflight.clear()
            if not 0 <= have <= total:
                raise _Refused("reply", f"node {node}: have {have} outside 0..{total}")
            rounds.saw(have)
            await rounds.end(f"CHUNK at {off} answered have {have}")
            nxt = have
    finally:
        for _, _, t in inflight:
            t.cancel()
        for _, _, t in inflight:
            with contextlib.suppress(asyncio.CancelledError, CommandError):
                await t


async def _verdict(ch: CommandChannel, node: str, version: str | None, timeout: float,
                   confirm_s: float, poll_s: float) -> Outcome:
    """After APPLY: ask the node until it confirmed the candidate or went back."""
    deadline = time.monotonic() + confirm_s
    last: dict[str, Any] = {}
    applied_again = False
    while time.monotonic() < deadline:
        try:
            code, res = await ch.command(node, OP_STATUS, {}, timeout, retries=0)
        except CommandError:
            await asyncio.sleep(poll_s)  # rebooting, or the link is away for a moment
            continue
        if code == OK and isinstance(res, dict):
            last = res
            upd: dict[str, Any] = res["upd"] if isinstance(res.get("upd"), dict) else {}
            fw = res.get("fw")
            fw = fw if isinstance(fw, str) else None
            state = upd.get("state")
            if state == "confirmed" and (version is None or fw == version):
                return Outcome(node, "updated", None, fw, f"runs {fw}")
            if state == "rolled_back" or (state == "confirmed" and fw != version):
                why = upd.get("reason")
                reason = str(why) if why else f"runs {fw}, not {version}"
                return Outcome(node, "rolled_back", reason, fw,
                               f"went back to {fw}: {reason}")
            if state == "staging" and upd.get("have") and not applied_again:
                # our APPLY's answer was lost before the node acted on it: apply once more
                applied_again = True
                with contextlib.suppress(CommandError):
                    await ch.command(node, OP_UPDATE_APPLY, {}, timeout)
        await asyncio.sleep(poll_s)
    fw = last.get("fw") if isinstance(last.get("fw"), str) else None
    upd = last["upd"] if isinstance(last.get("upd"), dict) else {}
    return Outcome(node, "unreachable", "no_confirmation", fw,
                   f"no confirmation within {confirm_s:g} s (last state: "
                   f"{upd.get('state', 'no answer')})")
