"""Gateway config and key files (agent/config.py): errors name file, line, key and the fix."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lantern.agent.config import check_secret_file, load_config, load_keys, write_secret
from lantern.agent.errors import ConfigError, LanternError

GOOD = """\
[gateway]
state_dir = "state"
keys_file = "keys.toml"
log_level = "info"

[[links.serial]]
port = "/dev/ttyUSB0"
baud = 115200

[batch]
max_records = 100
max_age_s = 2.5

[sinks.http]
url = "https://platform.example/senml"
timeout_s = 5
token_file = "token"
"""

KEY_A = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
KEY_B = "ff" * 32


@pytest.fixture
def cfg_dir(tmp_path: Path) -> Path:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    token.chmod(0o600)
    return tmp_path


def write_cfg(d: Path, text: str) -> Path:
    p = d / "gateway.toml"
    p.write_text(text)
    return p


def replace_line(n: int, new: str | None) -> Callable[[str], str]:
    """Replace (or with None delete) line n (1-based) of the good config."""

    def edit(text: str) -> str:
        lines = text.splitlines()
        if new is None:
            del lines[n - 1]
        else:
            lines[n - 1] = new
        return "\n".join(lines) + "\n"

    return edit


def append(extra: str) -> Callable[[str], str]:
    return lambda text: text + extra


def assert_names(msg: str, path: Path, key: str, line: int | None) -> None:
    assert path.name in msg, msg
    assert key in msg, msg
    if line is not None:
        assert re.search(rf"\bline {line}\b", msg), f"no 'line {line}' in: {msg}"


# ---------------------------------------------------------------- config


def test_good_config_loads(cfg_dir: Path) -> None:
    path = write_cfg(cfg_dir, GOOD)
    cfg = load_config(path)
    assert cfg.path == path
    assert cfg.state_dir == cfg_dir / "state"
    assert cfg.keys_file == cfg_dir / "keys.toml"
    assert cfg.log_level == "info"
    assert [(s.port, s.baud) for s in cfg.serial] == [("/dev/ttyUSB0", 115200)]
    assert cfg.batch_max_records == 100
    assert cfg.batch_max_age_s == 2.5
    assert cfg.http is not None
    assert cfg.http.url == "https://platform.example/senml"
    assert cfg.http.timeout_s == 5.0 and isinstance(cfg.http.timeout_s, float)
    assert cfg.http.token_file == cfg_dir / "token"


def test_defaults(cfg_dir: Path) -> None:
    path = write_cfg(cfg_dir, '[gateway]\nkeys_file = "k.toml"\n[[links.serial]]\n'
                              'port = "/dev/ttyS0"\n[sinks.http]\nurl = "http://x:1/in"\n')
    cfg = load_config(path)
    assert cfg.serial[0].baud == 115200
    assert (cfg.batch_max_records, cfg.batch_max_age_s) == (500, 1.0)
    assert cfg.http is not None and cfg.http.token_file is None and cfg.http.timeout_s == 10.0


# (edit of the good file, key the message must name, line it must name, other text it must hold)
BAD_CONFIGS: dict[str, tuple[Callable[[str], str], str, int, str]] = {
    # missing: the line of the table the key belongs in
    "missing keys_file": (replace_line(3, None), "gateway.keys_file", 1, "keys_file ="),
    "url without scheme": (replace_line(15, 'url = "localhost:8080"'), "sinks.http.url", 15,
                           "http(s) URL"),
    "ftp url": (replace_line(15, 'url = "ftp://example.org/x"'), "sinks.http.url", 15,
                "http(s) URL"),
    "negative max_age_s": (replace_line(12, "max_age_s = -1.5"), "batch.max_age_s", 12, "> 0"),
    "zero timeout": (replace_line(16, "timeout_s = 0"), "sinks.http.timeout_s", 16, "> 0"),
    "max_records as text": (replace_line(11, 'max_records = "ten"'), "batch.max_records", 11,
                            "expected int"),
    "max_records out of range": (replace_line(11, "max_records = 0"), "batch.max_records", 11,
                                 "1..10000"),
    "bool is not a number": (replace_line(12, "max_age_s = true"), "batch.max_age_s", 12,
                             "expected"),
    "bad log level": (replace_line(4, 'log_level = "loud"'), "gateway.log_level", 4, "debug"),
    "unknown section": (append("\n[gatewya]\nkeys_file = \"k.toml\"\n"), "gatewya", 19,
                        "unknown section"),
    "second serial link, bad baud": (
        append('\n[[links.serial]]\nport = "/dev/ttyUSB1"\nbaud = -9600\n'),
        "links.serial[1].baud", 21, "must be 50 to 4000000"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_names_file_line_and_key(case: str, cfg_dir: Path) -> None:
    edit, key, line, fragment = BAD_CONFIGS[case]
    path = write_cfg(cfg_dir, edit(GOOD))
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert fragment in msg, msg
    assert_names(msg, path, key, line)


def test_invalid_toml_names_file_and_line(cfg_dir: Path) -> None:
    path = write_cfg(cfg_dir, replace_line(3, "keys_file = keys.toml")(GOOD))
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert path.name in msg and "TOML" in msg
    assert re.search(r"\bline 3\b", msg), msg


def test_no_sink_is_an_error(cfg_dir: Path) -> None:
    text = GOOD.split("[sinks.http]")[0]
    path = write_cfg(cfg_dir, text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert path.name in str(exc.value) and "[sinks.http]" in str(exc.value)


def test_unreadable_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope\.toml"):
        load_config(missing)


def test_token_file_readable_by_others_is_refused(cfg_dir: Path) -> None:
    (cfg_dir / "token").chmod(0o644)
    path = write_cfg(cfg_dir, GOOD)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert "chmod 600" in str(exc.value) and "token" in str(exc.value)


def test_config_error_is_a_lantern_error() -> None:
    assert issubclass(ConfigError, LanternError)


# ---------------------------------------------------------------- key file


def write_keys(d: Path, text: str, mode: int = 0o600) -> Path:
    p = d / "keys.toml"
    p.write_text(text)
    p.chmod(mode)
    return p


def test_good_keys_load(tmp_path: Path) -> None:
    p = write_keys(tmp_path, f'[nodes]\n"SL-0001" = "{KEY_A}"\nSL-0002 = "{KEY_B.upper()}"\n')
    assert load_keys(p) == {b"SL-0001": bytes.fromhex(KEY_A), b"SL-0002": b"\xff" * 32}


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o700 | 0o004])
def test_key_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    p = write_keys(tmp_path, f'[nodes]\n"SL-0001" = "{KEY_A}"\n', mode)
    with pytest.raises(ConfigError) as exc:
        load_keys(p)
    msg = str(exc.value)
    assert "chmod 600" in msg and str(p) in msg
    assert f"{mode:04o}" in msg


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_private_key_file_is_accepted(tmp_path: Path, mode: int) -> None:
    p = write_keys(tmp_path, f'[nodes]\n"SL-0001" = "{KEY_A}"\n', mode)
    assert list(load_keys(p)) == [b"SL-0001"]


# (value line 3 of the key file, key the message must name, text it must hold)
BAD_KEYS: dict[str, tuple[str, str, str]] = {
    "bad hex": (f'"SL-0002" = "{"zz" * 32}"', "nodes.SL-0002", "64 hex digits"),
    "short key": (f'"SL-0002" = "{"00" * 16}"', "nodes.SL-0002", "64 hex digits"),
    "long key": (f'"SL-0002" = "{"00" * 33}"', "nodes.SL-0002", "64 hex digits"),
    "key not a string": ('"SL-0002" = 12345', "nodes.SL-0002", "64 hex digits"),
    "node id with a space": (f'"bad id!" = "{KEY_A}"', "bad id!", "node id"),
    "node id too long": (f'"{"N" * 33}" = "{KEY_A}"', "N" * 33, "node id"),
    "node id with a dot, bad key": ('"SL.0003" = "abc"', "nodes.SL.0003", "64 hex digits"),
}


@pytest.mark.parametrize("case", list(BAD_KEYS))
def test_bad_key_entry_is_refused(tmp_path: Path, case: str) -> None:
    line3, key, fragment = BAD_KEYS[case]
    p = write_keys(tmp_path, f'[nodes]\n"SL-0001" = "{KEY_A}"\n{line3}\n')
    with pytest.raises(ConfigError) as exc:
        load_keys(p)
    msg = str(exc.value)
    assert fragment in msg, msg
    assert_names(msg, p, key, 3)


def test_key_file_without_nodes_table(tmp_path: Path) -> None:
    p = write_keys(tmp_path, f'[node]\n"SL-0001" = "{KEY_A}"\n')
    with pytest.raises(ConfigError) as exc:
        load_keys(p)
    assert "nodes" in str(exc.value) and p.name in str(exc.value)


def test_check_secret_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        check_secret_file(tmp_path / "absent", "node key file")


# ---------------------------------------------------------------- write_secret


@pytest.fixture
def no_umask() -> Iterator[None]:
    """umask 0: whatever mode a file gets, it is the one the code asked for."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode_of(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.usefixtures("no_umask")
def test_write_secret_creates_a_0600_file(tmp_path: Path) -> None:
    p = tmp_path / "keys.toml"
    write_secret(p, f'[nodes]\n"SL-0001" = "{KEY_A}"\n')
    assert mode_of(p) == 0o600
    assert load_keys(p) == {b"SL-0001": bytes.fromhex(KEY_A)}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["keys.toml"]


def test_write_secret_keeps_the_owner_of_the_file_it_replaces(tmp_path: Path) -> None:
    """`lantern provision` as root rewrites /etc/lantern/keys.toml, owned by the gateway's
    user: the new file must stay theirs, or the gateway can no longer read its keys."""
    p = tmp_path / "keys.toml"
    write_secret(p, "old")
    owner = (4242, 4243) if os.getuid() == 0 else (os.getuid(), os.getgid())
    os.chown(p, *owner)
    write_secret(p, f'[nodes]\n"SL-0001" = "{KEY_A}"\n')
    st = p.stat()
    assert (st.st_uid, st.st_gid) == owner and mode_of(p) == 0o600
    assert load_keys(p) == {b"SL-0001": bytes.fromhex(KEY_A)}


@pytest.mark.usefixtures("no_umask")
def test_write_secret_replaces_an_open_file(tmp_path: Path) -> None:
    p = tmp_path / "token"
    p.write_text("old")
    p.chmod(0o644)
    write_secret(p, "new")
    assert p.read_text() == "new"
    assert mode_of(p) == 0o600


@pytest.mark.usefixtures("no_umask")
def test_write_secret_ignores_a_stale_temp_file(tmp_path: Path) -> None:
    """A temp file left by an interrupted earlier run must not lend its mode to the secret."""
    p = tmp_path / "token"
    stale = tmp_path / "token.tmp"
    stale.write_text("half-written")
    stale.chmod(0o644)
    write_secret(p, "new")
    assert p.read_text() == "new"
    assert mode_of(p) == 0o600


# ---------------------------------------------------------------- unknown keys, every section

# One config with every section and every sink/link table (each section's first line is its
# header), and for each one a key it knows: a typo put into any of them must be refused, naming
# the file, the typo's line, its dotted key and the keys the section expected (`baudrate =`
# must not run at 115200, `token =` must not run unauthenticated).
EVERY_SECTION: dict[str, tuple[str, str, str]] = {
    # section: (its text, the typo's dotted key, a key the message must list as expected)
    "gateway": ('[gateway]\nkeys_file = "keys.toml"\n', "gateway.keys_dir", "keys_file"),
    "links.serial": ('[[links.serial]]\nport = "/dev/ttyUSB0"\n', "links.serial[0].baudrate",
                     "baud"),
    "links.ble": ("[[links.ble]]\n", "links.ble[0].adaptor", "adapter"),
    "links.ble.devices": ('[[links.ble.devices]]\naddress = "A4:C1:38:00:11:22"\n'
                          'name = "park-1"\n', "links.ble.devices[0].bindkey", "bindkey_file"),
    "batch": ("[batch]\nmax_records = 10\n", "batch.max_age", "max_age_s"),
    "sinks.http": ('[sinks.http]\nurl = "https://platform.example/senml"\n', "sinks.http.token",
                   "token_file"),
    "sinks.ngsi_ld": ('[sinks.ngsi_ld]\nurl = "http://orion:1026"\n', "sinks.ngsi_ld.tennant",
                      "tenant"),
    "sinks.mqtt": ('[sinks.mqtt]\nhost = "mqtt.local"\n', "sinks.mqtt.password",
                   "password_file"),
    "api": ("[api]\nenabled = true\n", "api.token", "token_file"),
    "queue": ("[queue]\nmax_mb = 64\n", "queue.max_bytes", "max_mb"),
    "history": ("[history]\nkeep_hours = 1\n", "history.keep_days", "keep_hours"),
    "nodes": ('[nodes."SL-0042"]\npole = "42"\n', "nodes.SL-0042.lat", "location"),
}


@pytest.mark.parametrize("section", list(EVERY_SECTION))
def test_unknown_key_is_refused_in_every_section(section: str, tmp_path: Path) -> None:
    blocks: list[str] = []
    line = 0
    for name, (text, typo, _) in EVERY_SECTION.items():
        if name == section:
            header, rest = text.split("\n", 1)
            line = sum(b.count("\n") for b in blocks) + 2
            text = f"{header}\n{typo.rsplit('.', 1)[1]} = 1\n{rest}"
        blocks.append(text + "\n")
    path = write_cfg(tmp_path, "".join(blocks))
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    typo, expected = EVERY_SECTION[section][1:]
    assert f"{path} line {line}: {typo}: unknown key; expected " in msg, msg
    assert expected in msg.split("expected ", 1)[1], msg


def test_the_config_with_every_section_loads(tmp_path: Path) -> None:
    path = write_cfg(tmp_path, "\n".join(t for t, _, _ in EVERY_SECTION.values()))
    cfg = load_config(path)
    assert cfg.serial and cfg.ble and cfg.http and cfg.ngsi_ld and cfg.mqtt and cfg.nodes


@pytest.mark.parametrize(("text", "key", "says"), [
    ('[links.serail]\nport = "/dev/ttyUSB0"\n', "links.serail", "unknown link; expected serial or "
     "ble"),
    ('[sinks.htp]\nurl = "http://x"\n', "sinks.htp", "unknown sink; expected http, ngsi_ld, "
     "mqtt, sensorthings or sensor_community"),
])
def test_unknown_link_or_sink_kind_is_refused(text: str, key: str, says: str,
                                              cfg_dir: Path) -> None:
    path = write_cfg(cfg_dir, GOOD + "\n" + text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert f"{path} line 19: {key}: {says}" in str(exc.value), str(exc.value)
