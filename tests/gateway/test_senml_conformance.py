"""What the gateway sends upstream as SenML, checked against the text of RFC 8428 and the unit
and version rules of RFC 8798 and RFC 9100 (docs/corrections.md "Conformance").

The readings are real: the sampler on the simulated street (corrections, offsets and quality
flags included), sealed as the node seals them (node/app.py), resolved by the gateway's
forward stage and POSTed by the HTTP sink to a receiver that keeps the raw body.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from node import cbor, senml
from node.sampler import Sampler

from lantern.agent.queue.resolve import PACK, Batch, resolve
from lantern.agent.sinks import mqtt
from lantern.agent.sinks.http import (
    SECONDARY_UNITS,
    SECONDARY_VERSION,
    HttpSink,
    HttpSinkConfig,
    senml_body,
)
from lantern.agent.units import UNITS
from lantern.tools.street.upstream import Upstream
from tests.helpers.clock import VirtualClock, street

BOARDS = Path(__file__).resolve().parents[2] / "boards"

# RFC 8428 §12.1 (the SenML Units registry as RFC 8428 created it) and the primary units
# RFC 8798 §2 added (B, VA, VAs, var, vars, J/m, kg/m3, deg)
PRIMARY_UNITS = frozenset((
    "m", "kg", "g", "s", "A", "K", "cd", "mol", "Hz", "rad", "sr", "N", "Pa", "J", "W", "C", "V",
    "F", "Ohm", "S", "Wb", "T", "H", "Cel", "lm", "lx", "Bq", "Gy", "Sv", "kat", "m2", "m3", "l",
    "m/s", "m/s2", "m3/s", "l/s", "W/m2", "cd/m2", "bit", "bit/s", "lat", "lon", "pH", "dB",
    "dBW", "Bspl", "count", "/", "%", "%RH", "%EL", "EL", "1/s", "1/min", "beat/min", "beats",
    "S/m", "B", "VA", "VAs", "var", "vars", "J/m", "kg/m3", "deg"))
# RFC 8428 §4.5.1: the characters a name may use, and how it starts (the draft's set; the
# published RFC also allows "/", which Lantern's names do not use)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-:._]*")
# RFC 8428 §5 (JSON labels) and §4.1-4.2 (base and regular fields)
BASE_LABELS = {"bn", "bt", "bu", "bv", "bs"}  # "bver" is the one a resolved record may keep
VALUE_LABELS = {"v", "vs", "vb", "vd"}
REGISTERED_LABELS = BASE_LABELS | VALUE_LABELS | {"bver", "n", "u", "s", "t", "ut"}
ABSOLUTE = 1 << 28  # RFC 8428 §4.5.3: times at or above 2**28 are absolute


def street_readings(n: int = 3) -> list[tuple[int, dict[str, Any]]]:
    """(time, values) of a full simulated board, as the sampler hands them to the node."""
    from node import board as boards

    from tests.helpers.clock import install

    b = json.loads((BOARDS / "unix-sim.json").read_text())
    boards.validate(b)
    clock = VirtualClock()
    mp = pytest.MonkeyPatch()
    install(clock, mp)
    try:
        buses, scale, sc = street(b, clock)
        sc.aerosol_kappa = 0.4
        s = Sampler(b, buses, scale, log=lambda m: None,
                    cfg={"offsets": {"temperature": -0.6, "LAeq": 1.2}})
        out = []
        for _ in range(n):
            clock.advance(60_000)
            v = dict(s.sample_blocking())
            v.update(uptime=60, heap_free=51234, heap_peak=90000, cycle_ms=812, outbox=3)
            out.append((int(clock.ms // 1000), v))
        return out
    finally:
        mp.undo()


def seal(now: int, values: dict[str, Any]) -> bytes:
    """The pack as node/app.py seals it (canonical names without a unit, no base name)."""
    records = [senml.record(k, senml.quantize(values[k])) for k in sorted(values)]
    return bytes(cbor.dumps(senml.pack(None, now, records)))


def batch() -> Batch:
    items, rids = [], []
    for seq, (now, values) in enumerate(street_readings()):
        records, text = resolve("SL-0042", seq, PACK, seal(now, values))
        items.append(text)
        rids += [r["id"] for r in records]
    return Batch(0, len(items) - 1, 0.0, rids, items)


class Receiver(Upstream):
    """The stock receiver (tools/street/upstream.py), keeping each raw body and its type."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []
        self.types: list[str] = []

    async def _post(self, request: web.Request) -> web.Response:
        self.types.append(request.headers["Content-Type"])
        self.bodies.append(await request.read())
        return await super()._post(request)


@pytest.fixture(name="sent")
async def sent_fixture() -> AsyncIterator[tuple[Receiver, Batch]]:
    rx = Receiver()
    url = await rx.start()
    b = batch()
    try:
        async with HttpSink(HttpSinkConfig(url=url)) as sink:
            await sink.send(b)
        yield rx, b
    finally:
        await rx.stop()


def records_of(rx: Receiver) -> list[dict[str, Any]]:
    assert len(rx.bodies) == 1
    pack = json.loads(rx.bodies[0].decode("utf-8"))  # §5: UTF-8 JSON
    assert isinstance(pack, list) and pack and all(isinstance(r, dict) for r in pack)  # §5
    return pack


def test_media_type(sent: tuple[Receiver, Batch]) -> None:
    """RFC 8428 §12.3.1: SenML in JSON is application/senml+json."""
    assert sent[0].types == ["application/senml+json"]


def test_the_batch_is_all_there(sent: tuple[Receiver, Batch]) -> None:
    rx, b = sent
    pack = records_of(rx)
    assert [r["id"] for r in pack] == b.rids
    names = {r["n"].rpartition(":")[2] for r in pack}
    assert {"pm2_5_corr", "temperature_offset", "LAeq_offset", "co2", "cycle_ms"} <= names


def test_names(sent: tuple[Receiver, Batch]) -> None:
    """RFC 8428 §4.5.1: a name of A-Z a-z 0-9 - : . _, starting with a letter or digit."""
    for r in records_of(sent[0]):
        assert NAME.fullmatch(r["n"]), r["n"]


def test_exactly_one_value(sent: tuple[Receiver, Batch]) -> None:
    """RFC 8428 §4.2: exactly one value field in a record without a sum; `v` a number."""
    for r in records_of(sent[0]):
        assert len(VALUE_LABELS & set(r)) == 1 and "s" not in r, r
        if "v" in r:
            assert isinstance(r["v"], int | float) and not isinstance(r["v"], bool), r


def test_times_are_absolute(sent: tuple[Receiver, Batch]) -> None:
    """RFC 8428 §4.5.3: an absolute time is at least 2**28 (resolved records: §4.6)."""
    for r in records_of(sent[0]):
        assert isinstance(r["t"], int | float) and r["t"] >= ABSOLUTE, r


def test_resolved_records_carry_no_base_field(sent: tuple[Receiver, Batch]) -> None:
    """RFC 8428 §4.6: a resolved record has no base fields (bver excepted)."""
    for r in records_of(sent[0]):
        assert not BASE_LABELS & set(r), r


def test_extension_labels_are_not_must_understand(sent: tuple[Receiver, Batch]) -> None:
    """RFC 8428 §4.4: a label ending in "_" must be understood; ours ("id") may be ignored."""
    for r in records_of(sent[0]):
        assert set(r) - REGISTERED_LABELS <= {"id"}, r
        assert not any(k.endswith("_") for k in r)


def test_units_are_registered(sent: tuple[Receiver, Batch]) -> None:
    """RFC 8428 §12.1 with RFC 8798 §2 (primary) and §3 (secondary units)."""
    for r in records_of(sent[0]):
        if "u" in r:
            assert r["u"] in PRIMARY_UNITS | SECONDARY_UNITS, r
    assert set(UNITS.values()) <= PRIMARY_UNITS | SECONDARY_UNITS
    assert not PRIMARY_UNITS & SECONDARY_UNITS


def test_secondary_units_only_in_a_version_that_has_them(sent: tuple[Receiver, Batch]) -> None:
    """RFC 8798 §3 and RFC 9100 §4: a secondary unit needs the Secondary Units feature (code
    4) in the version, RFC 9100 §2: bver is the feature bitmap, 10 its base bits, so 26."""
    pack = records_of(sent[0])
    secondary = [r for r in pack if r.get("u") in SECONDARY_UNITS]
    assert {r["u"] for r in secondary} >= {"ppm", "ug/m3", "ms"}  # co2, PM, cycle_ms
    version = 10  # RFC 8428 §4.1: the default; bver applies to its record and those after it
    for r in pack:
        version = r.get("bver", version)
        if r.get("u") in SECONDARY_UNITS:
            assert r.get("bver") == SECONDARY_VERSION == 26, r  # on the record itself (§4.6)
            assert version & (1 << 4), r
    for r in pack:
        if "bver" in r:
            v = r["bver"]
            assert isinstance(v, int) and v > 0 and v & 0b1111 == 0b1010, r  # RFC 9100 §3


def test_numbers_as_rfc_8428_writes_them(sent: tuple[Receiver, Batch]) -> None:
    """RFC 8428 §5: an exponent's "e" in lower case; mantissa under 19 characters."""
    text = sent[0].bodies[0].decode()
    numbers = re.findall(r'(?<=[:\[,])-?[0-9][0-9.eE+-]*', text)
    assert numbers
    for num in numbers:
        assert "E" not in num, num
        assert len(num.partition("e")[0].lstrip("-")) < 19, num


def test_a_record_is_the_same_bytes_in_every_batch() -> None:
    """The version is decided per record: a retry in another batch sends the same record."""
    b = batch()
    whole = json.loads(senml_body(b))
    alone = [r for i in range(len(b.json_items))
             for r in json.loads(senml_body(Batch(i, i, 0.0, [], [b.json_items[i]])))]
    assert whole == alone


@pytest.mark.parametrize("kind", ["senml+json", "senml+cbor"])
def test_mqtt_one_record_packs_say_their_version(kind: str) -> None:
    import cbor2

    record = {"n": "urn:dev:lantern:SL-0042:co2", "t": 1_750_064_400, "u": "ppm", "v": 431,
              "id": "SL-0042:1:3"}
    raw = mqtt.payload(record, kind)
    pack = json.loads(raw) if kind == "senml+json" else cbor2.loads(raw)
    bver = pack[0].get("bver" if kind == "senml+json" else -1, 10)
    assert bver & (1 << 4)
