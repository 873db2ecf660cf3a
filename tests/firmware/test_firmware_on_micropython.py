"""The firmware's pure modules on the MicroPython unix port: same bytes as CPython, gateway-valid.

A script builds SenML packs with node.senml, encodes them with node.cbor, seals them with
node.cose and frames them with node.frame; it runs once on MicroPython (-X heapsize=110K, as a
small board) and once on CPython, and both must print the same bytes, which the gateway's
independent implementation (agent/protocol.py: cbor2, cobs, hmac) must accept.
"""

import ast
import base64
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from lantern.agent import protocol
from lantern.agent.units import UNITS
from tests.helpers.quantize import reference

ROOT = Path(__file__).resolve().parents[2]
FIRMWARE = ROOT / "firmware"
NODE_DIR = FIRMWARE / "node"
MICROPYTHON = ROOT / ".build/micropython/unix/micropython"
MP_EXTMOD = ROOT / ".build/micropython/extmod"
HEAP = "110K"

pytestmark = pytest.mark.micropython

KEY = bytes(range(32))
BT = 1764331200

# Floats chosen for each preferred width (RFC 8949 §4.2.2), as exact bit patterns so the test
# does not depend on how either VM parses decimal literals. The CPython oracle below checks
# that all three widths are really used.
FLOATS = [1.5, -0.0, 65504.0, 5.960464477539063e-08, 100000.0, 0.333333343267440796,
          3.4028234663852886e38, 0.1, 21.37, 1e-7, -1e300, 2.2250738585072014e-308]
INTS = [0, 1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63, 2**64 - 1,
        -1, -24, -25, -256, -257, -(2**32), -(2**63), -(2**64)]
OTHERS = [("door", True, None, None), ("tilt", False, None, None), ("status", "ok", None, None),
          ("température", 12.5, "Cel", None), ("blob", b"\xfb\xff\x00\x01", None, None),
          ("late", 1.25, "W", -5), ("later", 2, "s", 0.5)]

# node, seq, bt, whether the pack carries bn (protocol version 1) and its records: name, value,
# unit, t offset and how the node rounds the value ("raw": as given; None: to float32; an int:
# to those decimal places, then float32 - node/senml.py quantize). Values are passed to the
# script as hex bit patterns.
PACKS = {
    "widths": ("SL-0001", 70000, BT, True,
               [(f"f{i}", ("f64", struct.pack(">d", v).hex()), "Cel", None, "raw")
                for i, v in enumerate(FLOATS)]
               + [(f"i{i}", ("int", str(v)), None, None, "raw") for i, v in enumerate(INTS)]
               + [(n, ("lit", repr(v)), u, t, "raw") for n, v, u, t in OTHERS]),
    # docs/protocol.md §4 (tests/vectors/frames/sl0042-seq5-v2.json)
    "doc-vector": ("SL-0042", 5, BT, False,
                   [("heap_free", ("int", "98304"), None, None, None),
                    ("humidity", ("f64", struct.pack(">d", 48.25).hex()), None, None, 2),
                    ("pressure", ("f64", struct.pack(">d", 101325.31).hex()), None, None, 0),
                    ("temperature", ("f64", struct.pack(">d", 21.37).hex()), None, None, 2),
                    ("uptime", ("int", "3600"), None, None, None)]),
    # a node's pack as the sampler rounds it: what the gateway restores for each record
    "rounded": ("SL-0007", 9, BT, False,
                [("LAeq", ("f64", struct.pack(">d", 47.0).hex()), None, None, 1),
                 ("battery", ("f64", struct.pack(">d", 3.966).hex()), None, None, 3),
                 ("illuminance", ("f64", struct.pack(">d", 0.0).hex()), None, None, 1),
                 ("lamp_current", ("f64", struct.pack(">d", 1.5107).hex()), None, None, 4),
                 ("no2", ("f64", struct.pack(">d", 12.5).hex()), "ppb", None, 1),
                 ("pm2_5.q", ("int", "1"), None, None, None),
                 ("pressure", ("f64", struct.pack(">d", 98765.4321).hex()), None, None, 0),
                 ("temperature", ("f64", struct.pack(">d", -3.14159).hex()), None, None, 2),
                 ("energy", ("f64", struct.pack(">d", 0.0123456789).hex()), None, None, 6)]),
}
DOC_WIRE = bytes.fromhex(
    "001901d1844fa301040447534c2d30303432064105a0585a85a30d6968656170"
    "5f66726565021a03018008221a69298ec0a20f6868756d696469747902f95208"
    "a20c687072657373757265021a05018bcda2146b74656d706572617475726502"
    "fa41aaf5c3a21766757074696d6502190e10481cb3ff782cb3c1a03a7600")

SCRIPT = '''\
import binascii
import struct

from node import cbor, cose, frame, senml

KEY = bytes(range(32))


def value(kind, text):
    if kind == "f64":
        return struct.unpack(">d", binascii.unhexlify(text))[0]
    if kind == "int":
        return int(text)
    return eval(text)


def hexs(b):
    return binascii.hexlify(b).decode()


def rounded(x, places):
    if places == "raw":
        return x
    return senml.quantize(senml.quantize(x, places))


for label, (node, seq, bt, with_bn, spec) in PACKS:
    recs = [senml.record(name, rounded(value(*v), places), unit, t)
            for name, v, unit, t, places in spec]
    payload = cbor.dumps(senml.pack(senml.base_name(node) if with_bn else None, bt, recs))
    protected = {cose.H_ALG: cose.ALG_HMAC_256_64, cose.H_KID: node.encode(),
                 cose.H_PIV: cose.piv(seq)}
    mac0 = cose.mac0_create(KEY, payload, protected)
    wire = frame.encode(frame.DATA, mac0)
    print(label, hexs(payload), hexs(mac0), hexs(wire))
'''


def write_script(directory):
    path = directory / "seal.py"
    packs = list(PACKS.items())
    path.write_text(f"PACKS = {packs!r}\n\n{SCRIPT}", encoding="utf-8")
    return path


def run_micropython(args, timeout=60):
    assert MICROPYTHON.exists(), f"{MICROPYTHON} missing: run `make micropython`"
    env = {"MICROPYPATH": f"{FIRMWARE}:{MP_EXTMOD}", "PATH": os.environ.get("PATH", "")}
    return subprocess.run([str(MICROPYTHON), "-X", f"heapsize={HEAP}", *args], env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def parse(stdout):
    out = {}
    for line in stdout.splitlines():
        label, *parts = line.split()
        out[label] = tuple(bytes.fromhex(p) for p in parts)
    return out


@pytest.fixture(scope="module")
def sealed(tmp_path_factory):
    """{label: (payload, mac0, wire)} from MicroPython and from CPython."""
    script = write_script(tmp_path_factory.mktemp("mp"))
    mp = run_micropython([str(script)])
    assert mp.returncode == 0, mp.stderr + mp.stdout
    env = {**os.environ, "PYTHONPATH": str(FIRMWARE)}
    cp = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                        timeout=60, check=False)
    assert cp.returncode == 0, cp.stderr
    return parse(mp.stdout), parse(cp.stdout)


@pytest.mark.parametrize("label", PACKS)
@pytest.mark.parametrize("layer", ["pack", "mac0", "wire"])
def test_micropython_bytes_equal_cpython(sealed, label, layer):
    mp, cp = sealed
    assert set(mp) == set(cp) == set(PACKS)
    i = ("pack", "mac0", "wire").index(layer)
    assert mp[label][i].hex() == cp[label][i].hex()


def test_doc_vector_on_micropython(sealed):
    mp, _ = sealed
    assert mp["doc-vector"][2] == DOC_WIRE


def _spec_value(kind, text):
    if kind == "f64":
        return struct.unpack(">d", bytes.fromhex(text))[0]
    if kind == "int":
        return int(text)
    return ast.literal_eval(text)


def _f32_bits(v: float) -> bytes:
    return struct.pack(">f", v)


def _is_f32(v: float) -> bool:
    try:
        return bool(struct.unpack(">f", _f32_bits(v))[0] == v)
    except OverflowError:
        return False


def _same(a, b):
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack(">d", a) == struct.pack(">d", b)
    return bool(a == b)


@pytest.mark.parametrize("label", PACKS)
def test_gateway_accepts_micropython_frame(sealed, label):
    node, seq, bt, _, spec = PACKS[label]
    payload, mac0, wire = sealed[0][label]
    assert wire[0] == 0 and wire[-1] == 0 and b"\x00" not in wire[1:-1]
    assert protocol.Deframer().feed(wire) == [wire[1:-1]]
    ftype, body = protocol.decode_frame(wire[1:-1])
    assert (ftype, body) == (protocol.DATA, mac0)
    m = protocol.parse_mac0(body)
    assert (m.kid, m.seq, m.payload) == (node.encode(), seq, payload)
    protocol.verify_mac0(KEY, m)
    # The gateway's own COSE code produces the very same message.
    assert protocol.create_mac0(KEY, node.encode(), seq, payload) == mac0
    records = protocol.resolve_pack(m.payload, node=node)
    assert len(records) == len(spec)
    bn = f"urn:dev:lantern:{node}:"
    for (name, v, unit, t, places), r in zip(spec, records, strict=True):
        want = _spec_value(*v)
        if places != "raw":
            want = reference(want, places)
            if isinstance(want, float):
                want = reference(want, None)
        unit = unit or UNITS.get(name)
        if isinstance(want, bool):
            field = "vb"
        elif isinstance(want, str):
            field = "vs"
        elif isinstance(want, bytes):
            field, want = "vd", base64.urlsafe_b64encode(want).rstrip(b"=").decode()
        else:
            field = "v"
        assert set(r) == {"n", "t", field} | ({"u"} if unit else set())
        assert r["n"] == bn + name
        assert r.get("u") == unit
        if field == "v" and isinstance(want, float) and _is_f32(want):
            # the gateway shows a float32 as its shortest decimal: the same float32, bit for bit
            assert type(r[field]) is float and _f32_bits(r[field]) == _f32_bits(want), (
                name, r[field], want)
        else:
            assert _same(r[field], want), (name, r[field], want)
        assert _same(r["t"], bt + t if t else bt)


def _preferred_float(x):
    """RFC 8949 §4.2.2 preferred serialization, computed with CPython's struct only."""
    for fmt, head in ((">e", 0xF9), (">f", 0xFA)):
        try:
            b = struct.pack(fmt, x)
        except OverflowError:
            continue
        if struct.pack(">d", struct.unpack(fmt, b)[0]) == struct.pack(">d", x):
            return bytes((head,)) + b
    return b"\xfb" + struct.pack(">d", x)


def _shortest_int(n):
    major, arg = (0, n) if n >= 0 else (1, -1 - n)
    if arg < 24:
        return bytes((major << 5 | arg,))
    for ai, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if arg < 1 << (8 * size):
            return bytes((major << 5 | ai,)) + arg.to_bytes(size, "big")
    raise AssertionError(n)


def test_float_widths_and_ints_are_preferred(sealed):
    payload = sealed[0]["widths"][0]
    encodings = [_preferred_float(v) for v in FLOATS]
    assert {e[0] for e in encodings} == {0xF9, 0xFA, 0xFB}  # the pack covers all three widths
    # Record i is {0: "fi", 1: "Cel", 2: value} (the first one also carries bn and bt).
    for i, enc in enumerate(encodings):
        name = f"f{i}".encode()
        item = bytes((0x60 + len(name),)) + name + b"\x01\x63Cel\x02" + enc
        assert item in payload, (FLOATS[i], enc.hex())
    for i, v in enumerate(INTS):
        name = f"i{i}".encode()
        item = b"\xa2\x00" + bytes((0x60 + len(name),)) + name + b"\x02" + _shortest_int(v)
        assert item in payload, (v, _shortest_int(v).hex())


# ------------------------------------------------------------------------- module hygiene

def firmware_modules():
    """Dotted names of every module under firmware/node/ except the board HALs."""
    names = []
    for path in sorted(NODE_DIR.rglob("*.py")):
        rel = path.relative_to(FIRMWARE).with_suffix("")
        if "hal" in rel.parts:
            continue
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        names.append(".".join(parts))
    return names


MODULES = firmware_modules()


def test_module_list_is_complete():
    assert {"node", "node.frame", "node.cbor", "node.cose", "node.senml", "node.app",
            "node.drivers.sim_climate"} <= set(MODULES)
    assert not any(".hal" in m for m in MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_on_micropython(module):
    r = run_micropython(["-c", f"import {module}; print('imported', {module}.__name__)"])
    assert r.returncode == 0, r.stderr + r.stdout
    assert r.stdout.split() == ["imported", module]


PORT_ONLY = {"machine", "bluetooth", "esp32"}


def port_imports(source):
    """Port-specific modules a source file imports, by AST and by __import__/import_module."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    found |= set(re.findall(r"""(?:__import__|import_module)\(\s*['"](\w+)""", source))
    return found & PORT_ONLY


@pytest.mark.parametrize(("source", "want"), [
    ("import machine", {"machine"}),
    ("import os, bluetooth as bt", {"bluetooth"}),
    ("from esp32 import NVS", {"esp32"}),
    ("from machine.pin import Pin", {"machine"}),
    ("def f():\n    import machine\n", {"machine"}),
    ("try:\n    import bluetooth\nexcept ImportError:\n    pass\n", {"bluetooth"}),
    ("m = __import__('machine')", {"machine"}),
    ("from .hal import machine", set()),
    ("import machinery", set()),
    ("x = 'machine'", set()),
])
def test_port_import_detector(source, want):
    assert port_imports(source) == want


def test_no_port_imports_outside_hal():
    files = [p for p in NODE_DIR.rglob("*.py") if "hal" not in p.relative_to(NODE_DIR).parts]
    assert NODE_DIR / "frame.py" in files and NODE_DIR / "app.py" in files
    offenders = {str(p.relative_to(FIRMWARE)): sorted(port_imports(p.read_text("utf-8")))
                 for p in files}
    assert {f: m for f, m in offenders.items() if m} == {}
