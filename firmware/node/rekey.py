"""Key rotation on the node: OP_REKEY and OP_REKEY_COMMIT (docs/protocol.md, "Key rotation and
configuration"), and the boot step that finishes a commit a power cut interrupted.

Loaded with those commands (and at boot only when a rotation record exists), given back after:
most nodes rotate a key once a year.

The record (`state_dir/key.rk`) is CBOR, written atomically with the key file's mode (0600):
  {"v": key version, "k": current key, "prev": the key before it or None,
   "first": the first frame sequence sealed under "k" (None for the provisioned key),
   "p": pending [version, gateway public, node public, new key] or None,
   "x": 1 once a command under "k" retired "prev" (absent until then)}
A commit is one write of the record (its commit point), then the key store takes the new key.
A power cut between the two leaves the record ahead of the store: `boot` rolls it forward.
"""

import os

from . import cbor
from .outbox import _write_atomic

INFO = b"lantern rekey v1"
# (a name of this module: the protocol's vector test fixes it). The QEMU board's port has no
# os.urandom: with no random source a board refuses to rotate rather than boot no more.
_urandom = getattr(os, "urandom", None)
RECORD = "/key.rk"
_ITEMS = 32  # what decoding the record may build (it holds 5 keys and a 4-item list)


def journal_path(cfg):
    """Where the rotation record lives (node/start.py keys looks for RECORD there too)."""
    return cfg["state_dir"] + RECORD


def _umask(mask):
    """Set the process's umask (CPython; the unix port through libc); None where files keep no
    mode (littlefs, FAT: ESP32 and the QEMU board)."""
    um = getattr(os, "umask", None)
    if um is None:
        try:
            import ffi  # type: ignore[import-not-found]  # the unix port: os has no umask

            um = ffi.open("libc.so.6").func("i", "umask", "i")
        except (ImportError, OSError, AttributeError):
            return None
    return um(mask)


def write_private(path, data):
    """Replace `path` atomically by a file only its owner reads, as the key file is (0600)."""
    old = _umask(0o077)
    try:
        _write_atomic(path, data)
    finally:
        if old is not None:
            _umask(old)


def read(path):
    """The rotation record, or None if there is none (or it cannot be read: said once)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        st = cbor.loads(data, _ITEMS)
        k = st.get("k") if isinstance(st, dict) else None
        if isinstance(k, bytes) and len(k) == 32:
            return st
    except (ValueError, TypeError):
        pass
    print("rekey: %s unreadable: ignored (the key store's key stays current)" % path)
    return None


def _store_key(cfg, hal, key):
    """Put `key` where the node loads it from at boot (node/start.py node_key)."""
    if cfg.get("key_store") == "nvs":
        store = getattr(hal, "store_key", None)
        if store is not None:
            store(key)
        else:  # hal/esp32.py keeps the key as the blob node_key in its NVS namespace
            hal.nvs_set_blob("node_key", key)
    else:
        write_private(cfg["key_file"], key.hex().encode() + b"\n")


def boot(cfg, hal, key):
    """(key, version, previous key, first sequence) for a node whose key store holds `key`.

    Finishes a commit a power cut interrupted (the record holds a key whose "prev" is the
    stored one); forgets a record about another key (the node was provisioned again).
    """
    path = journal_path(cfg)
    st = read(path)
    if st is None:
        return key, 0, None, None
    cur = st["k"]
    if cur != key:
        if st.get("prev") != key:
            # the store holds a key this record never knew: a new key from `lantern provision`
            print("rekey: %s is about another key: removed" % path)
            try:
                os.remove(path)
            except OSError:
                pass
            return key, 0, None, None
        print("rekey: finishing the commit of key version %d" % st["v"])
        _store_key(cfg, hal, cur)
    return cur, st.get("v", 0), None if st.get("x") else st.get("prev"), st.get("first")


def _record(node):
    st = read(journal_path(node.cfg))
    if st is None or st["k"] != node.key:
        st = {"v": node.key_version, "k": node.key, "prev": node.key_prev,
              "first": node.key_first, "p": None}
    return st


def rekey(node, gw_pub, version):
    """OP_REKEY: (code, result). Derive a pending key from an ephemeral X25519 agreement."""
    if not isinstance(gw_pub, bytes) or len(gw_pub) != 32:
        return 2, {"error": "rekey is {1: gateway X25519 public key (32 bytes), 2: version}"}
    if not isinstance(version, int) or not node.key_version < version < 1 << 32:
        return 2, {"error": "key version must be above %d (and below 2^32)" % node.key_version}
    path = journal_path(node.cfg)
    st = _record(node)
    p = st.get("p")
    if p is not None and p[0] == version and p[1] == gw_pub:
        return 0, {1: p[2], 2: version}  # asked again (its REPLY lost): the same answer
    if _urandom is None:
        return 3, {"error": "no random source on this board: it cannot rotate its key"}
    from .x25519 import hkdf, public, x25519

    priv = _urandom(32)
    shared = x25519(priv, gw_pub)
    if shared == bytes(32):  # a low-order point: the "agreement" would be public
        return 2, {"error": "gateway public key is a low-order point"}
    node_pub = public(priv)
    info = INFO + node.kid + version.to_bytes(4, "big")
    new = hkdf(shared, node.key, info, len(node.key))
    st["p"] = [version, gw_pub, node_pub, new]
    write_private(path, cbor.dumps(st))
    return 0, {1: node_pub, 2: version}


def commit(node, version):
    """OP_REKEY_COMMIT: (code, result). The pending key becomes current, sealing from now on."""
    if not isinstance(version, int):
        return 2, {"error": "commit is {2: key version}"}
    if version == node.key_version and node.key_first is not None:
        return 0, {2: version, 3: node.key_first}  # committed already: its REPLY was lost
    path = journal_path(node.cfg)
    st = _record(node)
    p = st.get("p")
    if p is None or p[0] != version:
        return 2, {"error": "no pending key version %d" % version}
    first = node.outbox._next  # Node.seal takes this number next, under the new key
    old = node.key
    new = p[3]
    write_private(path, cbor.dumps(
        {"v": version, "k": new, "prev": old, "first": first, "p": None}))
    # a power cut here: the next boot finishes the commit (boot above)
    try:
        _store_key(node.cfg, node.hal, new)
    except OSError as e:
        # the record is committed: the node seals under the new key now, and its next boot
        # writes the key store again
        print("rekey: key store not written (%r): the next boot does it" % (e,))
    _mark_used(node.cfg, node.hal, new)
    use_key(node, new, version, old, first)
    return 0, {2: version, 3: first}


def retire(node):
    """The first command under the current key: the previous key passes no more, not even for a
    COMMIT. Persisted as "x" in the record, which keeps "prev" (boot may still have to finish
    the commit with it); a failed write retires it until the next boot, which retires it again
    at the first command."""
    st = _record(node)
    node.key_prev = None
    st["x"] = 1
    try:
        write_private(journal_path(node.cfg), cbor.dumps(st))
    except OSError as e:
        print("rekey: previous key retirement not recorded (%r)" % (e,))


def _mark_used(cfg, hal, key):
    """Tie the counters to the new key at once, as node/start.py bind_state does at boot: a
    state_dir wiped before the next boot must not restart them under it."""
    import hashlib

    kid = hashlib.sha256(b"lantern key id v1" + key).digest()[:8].hex().encode()
    mark = getattr(hal, "mark_key_used", None)
    try:
        if mark is not None:
            mark(kid.decode())
        elif cfg.get("key_store") != "nvs":
            _write_atomic(cfg["key_file"] + ".used", kid)
        _write_atomic(cfg["state_dir"] + "/key_id", kid)
    except OSError as e:  # the next boot's bind_state writes them
        print("rekey: key id not recorded (%r)" % (e,))


def use_key(node, key, version, prev, first):
    """Seal and check everything under `key` from now on; frames already in the outbox keep
    the MAC they were sealed with. (Here, not a Node method: its bytecode would stay loaded.)"""
    node.key = key
    node.key_version = version
    node.key_prev = prev
    node.key_first = first
    if node.link is not None:
        node.link._key = key  # ACKs and the BLE drain are checked under it
        if getattr(node.link, "_bindkey", None) is not None:  # encrypted BTHome adverts
            from . import bthome

            node.link._bindkey = bthome.derive_bindkey(key)
    commands = getattr(node, "_commands", None)
    if commands is not None:
        commands._key = key

