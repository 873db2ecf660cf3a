#!/usr/bin/env bash
# Install the Lantern gateway as a systemd service (run as root: `make install`).
#
#   /opt/lantern/                      a virtualenv holding Lantern (PREFIX)
#   /etc/systemd/system/lantern-gateway.service
#   /etc/lantern/gateway.toml          from docs/gateway.example.toml, if there is none yet
#   /etc/lantern/keys.toml             an empty [nodes] table, mode 0600, if there is none yet
#   user and group "lantern" (system), in groups dialout and bluetooth
#
# Existing config and keys are never overwritten. Environment knobs (for packaging and tests):
#   DESTDIR=dir        install under dir (no users, no systemctl)
#   PREFIX=path        where the virtualenv goes (default /opt/lantern)
#   LANTERN_BIN=path   use this lantern executable instead of building a virtualenv
set -euo pipefail

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DESTDIR="${DESTDIR:-}"
PREFIX="${PREFIX:-/opt/lantern}"
PYTHON="${PYTHON:-python3}"
UNIT=lantern-gateway.service

say() { printf '%s\n' "$*"; }

if [[ -z "${LANTERN_BIN:-}" ]]; then
    if ! "$PYTHON" -c "import ensurepip, venv" 2>/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
    fi
    say "installing Lantern into the virtualenv $DESTDIR$PREFIX"
    "$PYTHON" -m venv "$DESTDIR$PREFIX"
    "$DESTDIR$PREFIX/bin/pip" install -q --upgrade pip
    # setuptools builds in the source tree: leave the clone as it was
    made=()
    for d in "$SRC/build" "$SRC/lantern.egg-info"; do [[ -e "$d" ]] || made+=("$d"); done
    "$DESTDIR$PREFIX/bin/pip" install -q "$SRC"
    rm -rf "${made[@]}"
    LANTERN_BIN="$PREFIX/bin/lantern"
fi

if [[ -z "$DESTDIR" ]]; then
    getent group lantern >/dev/null || groupadd --system lantern
    getent passwd lantern >/dev/null || useradd --system --gid lantern \
        --home-dir /var/lib/lantern --no-create-home --shell /usr/sbin/nologin \
        --comment "Lantern gateway" lantern
    # the unit asks for both groups; bluetooth is BlueZ's D-Bus policy group
    for g in dialout bluetooth; do
        getent group "$g" >/dev/null || groupadd --system "$g"
    done
    usermod -a -G dialout,bluetooth lantern
    OWNER=(-o root -g lantern)
    KEY_OWNER=(-o lantern -g lantern)
else
    OWNER=()
    KEY_OWNER=()
fi

install -d -m 0755 "$DESTDIR/etc/systemd/system"
sed "s#/opt/lantern/bin/lantern#$LANTERN_BIN#g; s#/opt/lantern/share#$PREFIX/share#g" \
    "$SRC/packaging/systemd/$UNIT" > "$DESTDIR/etc/systemd/system/$UNIT.tmp"
chmod 0644 "$DESTDIR/etc/systemd/system/$UNIT.tmp"
mv "$DESTDIR/etc/systemd/system/$UNIT.tmp" "$DESTDIR/etc/systemd/system/$UNIT"

install -d -m 0750 "${OWNER[@]}" "$DESTDIR/etc/lantern"
if [[ ! -e "$DESTDIR/etc/lantern/gateway.toml" ]]; then
    install -m 0640 "${OWNER[@]}" "$SRC/docs/gateway.example.toml" "$DESTDIR/etc/lantern/gateway.toml"
    say "wrote /etc/lantern/gateway.toml (from docs/gateway.example.toml): edit port and url"
fi
if [[ ! -e "$DESTDIR/etc/lantern/keys.toml" ]]; then
    (umask 077; printf '%s\n' '# node id = 64 hex digits (a 256-bit key per node); keep this file mode 0600' \
        '[nodes]' > "$DESTDIR/etc/lantern/keys.toml")
    chmod 0600 "$DESTDIR/etc/lantern/keys.toml"
    [[ ${#KEY_OWNER[@]} -eq 0 ]] || chown lantern:lantern "$DESTDIR/etc/lantern/keys.toml"
    say "wrote /etc/lantern/keys.toml (mode 0600, owner lantern): add your nodes' keys"
fi

install -d -m 0755 "$DESTDIR$PREFIX/share/doc/lantern"
install -m 0644 "$SRC/docs/gateway.md" "$SRC/docs/gateway.example.toml" \
    "$DESTDIR$PREFIX/share/doc/lantern/"

if command -v systemd-analyze >/dev/null; then
    check="$DESTDIR/etc/systemd/system/$UNIT"
    if [[ -n "$DESTDIR" && -x "$DESTDIR$LANTERN_BIN" ]]; then
        # staged: verify a copy whose ExecStart= points into the staging tree
        tmp="$(mktemp -d)"
        sed "s#$LANTERN_BIN#$DESTDIR$LANTERN_BIN#g" "$check" > "$tmp/$UNIT"
        check="$tmp/$UNIT"
    fi
    systemd-analyze verify "$check"
    say "systemd-analyze verify: $UNIT is clean"
fi
if [[ -z "$DESTDIR" && -d /run/systemd/system ]]; then
    systemctl daemon-reload
fi

cat <<EOF

Lantern gateway installed. Next:
  1. edit /etc/lantern/gateway.toml (serial port, upstream url) and /etc/lantern/keys.toml
  2. $LANTERN_BIN gateway check-config --config /etc/lantern/gateway.toml
  3. systemctl enable --now lantern-gateway
  4. systemctl status lantern-gateway     # the STATUS line: nodes seen, links, queue, upstream
     journalctl -u lantern-gateway -f
     status page: http://127.0.0.1:8470/   (from elsewhere: ssh -L 8470:127.0.0.1:8470 <gateway>)
EOF
