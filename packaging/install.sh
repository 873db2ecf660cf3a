#!/usr/bin/env bash
# Install, upgrade or remove the Lantern gateway from an offline bundle (docs/install.md).
#
#   ./install.sh                 from an unpacked bundle (`make dist`), as root: no network
#   ./install.sh --uninstall     remove the code and the unit; config, keys and queue stay
#   ./install.sh --uninstall --purge    ... and /etc/lantern, /var/lib/lantern, user lantern
#
#   /opt/lantern/releases/V-H/  one virtualenv per installed bundle (V version, H wheel hash)
#   /opt/lantern/current        -> releases/V-H (switched atomically; the previous one is kept)
#   /opt/lantern/bin            -> current/bin (the unit runs /opt/lantern/bin/lantern)
#   /etc/systemd/system/lantern-gateway.service
#   /etc/lantern/gateway.toml   from gateway.example.toml, only if there is none
#   PREFIX/share/doc/lantern/prometheus/   the alert rules for Prometheus (docs/alerts.md)
#   /etc/lantern/keys.toml      an empty [nodes] table, mode 0600, only if there is none
#   /var/lib/lantern            the queue (the unit's StateDirectory), never touched
#   user and group "lantern" (system), in groups dialout and bluetooth
#
# An upgrade keeps config, keys and the queue; the new version must pass check-config (as user
# lantern) where the old one did, and start under systemd if the old one was running —
# otherwise the previous release comes back. Environment knobs:
#   PREFIX=path        the folder Lantern keeps to itself (default /opt/lantern): an install
#                      into one that holds anything else (PREFIX=/opt) is refused, and
#                      --uninstall removes only what Lantern put there
#   PYTHON=path       the CPython 3.11 the virtualenvs use (default /usr/bin/python3, which
#                      the service user can run)
#   DESTDIR=dir        lay out under dir, without users or systemctl (packaging)
#   LANTERN_BIN=path   no bundle: point the unit at this lantern (packaging, tests)
set -euo pipefail
umask 022

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DESTDIR="${DESTDIR:-}"
PREFIX="${PREFIX:-/opt/lantern}"
[[ "$PREFIX" == /* ]] || { printf 'install.sh: PREFIX=%s is not an absolute path\n' "$PREFIX" >&2
    exit 1; }
PREFIX="$(realpath -m -s -- "$PREFIX")"  # /opt/lantern/ and /opt//lantern are /opt/lantern
PYTHON="${PYTHON:-/usr/bin/python3}"
UNIT=lantern-gateway.service
UNIT_PATH="$DESTDIR/etc/systemd/system/$UNIT"
CONFIG=/etc/lantern/gateway.toml
STATE=/var/lib/lantern

say() { printf '%s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }
systemd_up() { [[ -z "$DESTDIR" && -d /run/systemd/system ]]; }
pid1() { cat /proc/1/comm 2>/dev/null || echo unknown; }

# What in PREFIX is Lantern's: its own layout (releases/, current, the bin link, its docs), and
# the one virtualenv an install from before releases/ made there (pyvenv.cfg). Anything else is
# someone else's: an install beside it is refused, an uninstall leaves it where it is.
ours() {  # ours DIR NAME: is DIR/NAME Lantern's?
    local venv=no
    [[ ! -f "$1/pyvenv.cfg" ]] || venv=yes
    case "$2" in
        releases | current | current.tmp) return 0 ;;
        bin) [[ -L "$1/bin" || $venv == yes ]] ;;
        share) [[ $venv == yes ]] || { [[ -d "$1/share" && ! -L "$1/share" ]] && [[ -z "$(find \
            "$1/share" -mindepth 1 -not -path "$1/share/doc" -not -path "$1/share/doc/lantern" \
            -not -path "$1/share/doc/lantern/*" -print -quit)" ]]; } ;;
        include | lib | lib64 | pyvenv.cfg) [[ $venv == yes ]] ;;
        *) return 1 ;;
    esac
}
others() {  # what else PREFIX holds, space-separated
    local dir="$DESTDIR$PREFIX" name out=()
    [[ -d "$dir" ]] || { [[ ! -e "$dir" ]] || printf '%s (a file)' "$PREFIX"; return 0; }
    while IFS= read -r -d '' name; do
        ours "$dir" "$name" || out+=("$name")
    done < <(find -H "$dir" -mindepth 1 -maxdepth 1 -printf '%f\0' | sort -z)
    printf '%s' "${out[*]}"
}

# ------------------------------------------------------------------------------- uninstall
if [[ "${1:-}" == --uninstall ]]; then
    purge=no
    [[ "${2:-}" != --purge ]] || purge=yes
    [[ -n "$DESTDIR" || $EUID -eq 0 ]] || die "run as root (sudo $0 $*)"
    if systemd_up; then
        systemctl disable --now "$UNIT" 2>/dev/null || true
    else
        say "systemd is not running here (PID 1 is $(pid1)): no service to stop or disable"
    fi
    rm -f "$UNIT_PATH"
    ! systemd_up || systemctl daemon-reload
    [[ ! -f "$DESTDIR$PREFIX.legacy/pyvenv.cfg" ]] || rm -rf "$DESTDIR$PREFIX.legacy"
    foreign="$(others)"
    if [[ -z "$foreign" ]]; then
        if [[ -L "$DESTDIR$PREFIX" ]]; then  # a link to where the operator keeps it: empty that
            find -H "$DESTDIR$PREFIX" -mindepth 1 -maxdepth 1 -exec rm -rf {} +
        fi
        rm -rf "$DESTDIR$PREFIX"
        say "removed $PREFIX and $UNIT"
    else  # PREFIX is shared (an install from before install.sh refused that): only Lantern's
        dir="$DESTDIR$PREFIX"
        rm -rf "$dir/releases" "$dir/current" "$dir/current.tmp" "$dir/share/doc/lantern"
        [[ ! -L "$dir/bin" ]] || rm -f "$dir/bin"
        rmdir "$dir/share/doc" "$dir/share" 2>/dev/null || true
        say "removed Lantern's releases, current, bin and docs from $PREFIX, and $UNIT;" \
            "kept $PREFIX itself and what else it holds ($foreign)"
        [[ ! -f "$dir/pyvenv.cfg" ]] || say "the virtualenv of an install from before" \
            "releases/ (pyvenv.cfg, bin, lib, include) is mixed with those in $PREFIX and was" \
            "left there: remove its parts by hand"
    fi
    if [[ $purge == yes ]]; then
        rm -rf "$DESTDIR/etc/lantern" "$DESTDIR$STATE"
        if [[ -z "$DESTDIR" ]]; then
            ! getent passwd lantern >/dev/null || userdel lantern
            ! getent group lantern >/dev/null || groupdel lantern
        fi
        say "purged /etc/lantern (config, keys), $STATE (the queue) and the user lantern"
    else
        say "kept /etc/lantern (config, keys) and $STATE (the queue, with any frames not yet" \
            "delivered): \`install.sh --uninstall --purge\` removes them and the user lantern"
    fi
    exit 0
fi
[[ $# -eq 0 ]] || die "unknown argument $1 (usage: install.sh [--uninstall [--purge]])"
[[ -n "$DESTDIR" || $EUID -eq 0 ]] || die "run as root (sudo $0)"
foreign="$(others)"
[[ -z "$foreign" ]] || die "PREFIX=$PREFIX already holds $foreign, which Lantern did not put" \
    "there: PREFIX is a folder Lantern keeps to itself (releases/, current, bin; --uninstall" \
    "removes it), e.g. PREFIX=${PREFIX%/}/lantern"

if [[ -f "$HERE/MANIFEST.sha256" ]]; then  # an unpacked bundle
    EXAMPLE="$HERE/gateway.example.toml"
    DOCS=("$HERE"/doc/*)
    RULES=("$HERE"/prometheus/*.yml)
    UNIT_SRC="$HERE/systemd/$UNIT"
else  # packaging/ in a clone
    EXAMPLE="$HERE/../docs/gateway.example.toml"
    DOCS=("$HERE/../docs/gateway.md" "$HERE/../docs/alerts.md" "$EXAMPLE")
    RULES=("$HERE"/prometheus/*.yml)
    UNIT_SRC="$HERE/systemd/$UNIT"
    [[ -n "${LANTERN_BIN:-}" ]] || die "this is packaging/ in a clone, not a bundle: run" \
        "\`make dist\` and \`make install\`, or copy .build/dist/lantern-*-gateway.tar.gz to" \
        "the gateway, unpack it and run its install.sh"
fi

# ------------------------------------------------------------------ the bundle and this machine
if [[ -z "${LANTERN_BIN:-}" ]]; then
    (cd "$HERE" && sha256sum --quiet --strict -c MANIFEST.sha256) \
        || die "the bundle in $HERE is damaged (MANIFEST.sha256 does not match): copy it again"
    read -r VERSION ARCH COMPILE < <("$PYTHON" - "$HERE/bundle.json" <<'EOF'
import json, platform, struct, sys
b = json.load(open(sys.argv[1]))
impl, ver = sys.implementation.name, "%d.%d" % sys.version_info[:2]
arch = platform.machine()
if arch in ("aarch64", "armv8l", "armv7l") and struct.calcsize("P") == 4:
    arch = "armv7l"  # a 32-bit userland (Raspberry Pi OS armhf) on a 64-bit kernel
if f"CPython {ver}" != b["python"] or impl != "cpython" or arch not in b["platforms"]:
    sys.exit(f"this bundle holds Lantern {b['version']} for {b['python']} on "
             f"{', '.join(b['platforms'])}; {sys.executable} is {impl} {ver} on {arch}: "
             "set PYTHON= to a CPython of that version, or build a bundle for this machine")
print(b["version"], arch, " ".join(b["compile_on_gateway"].get(arch, [])) or "-")
EOF
    ) || die "cannot install here (see above)"
    if [[ "$COMPILE" != - ]] && ! { command -v cc >/dev/null &&
            "$PYTHON" -c 'import os, sysconfig; os.stat(sysconfig.get_paths()["include"] + "/Python.h")' \
            2>/dev/null && [[ -e /usr/include/ffi.h || -n "$(ls /usr/include/*/ffi.h 2>/dev/null)" ]]; }; then
        die "on $ARCH, $COMPILE has no wheel on PyPI and is compiled here: install a C compiler" \
            "and headers first (apt-get install build-essential python3-dev libffi-dev)"
    fi
    whl=("$HERE"/wheels/lantern-"$VERSION"-*.whl)
    RELEASE="$PREFIX/releases/$VERSION-$(sha256sum "${whl[0]}" | cut -c1-8)"
    LANTERN_BIN="$PREFIX/bin/lantern"
fi

# ------------------------------------------------------------------------------ user and files
if [[ -z "$DESTDIR" ]]; then
    getent group lantern >/dev/null || groupadd --system lantern
    getent passwd lantern >/dev/null || useradd --system --gid lantern \
        --home-dir "$STATE" --no-create-home --shell /usr/sbin/nologin \
        --comment "Lantern gateway" lantern
    # the unit asks for both groups; bluetooth is BlueZ's D-Bus policy group
    for g in dialout bluetooth; do
        getent group "$g" >/dev/null || groupadd --system "$g"
    done
    usermod -a -G dialout,bluetooth lantern
    OWNER=(-o root -g lantern)
    AS_LANTERN=(runuser -u lantern --)
else
    OWNER=()
    AS_LANTERN=()
fi

install -d -m 0750 "${OWNER[@]}" "$DESTDIR/etc/lantern"
if [[ ! -e "$DESTDIR$CONFIG" ]]; then
    install -m 0640 "${OWNER[@]}" "$EXAMPLE" "$DESTDIR$CONFIG"
    say "wrote $CONFIG (from gateway.example.toml): edit port and url"
fi
if [[ ! -e "$DESTDIR/etc/lantern/keys.toml" ]]; then
    (umask 077; printf '%s\n' '# node id = 64 hex digits (a 256-bit key per node); keep this file mode 0600' \
        '[nodes]' > "$DESTDIR/etc/lantern/keys.toml")
    chmod 0600 "$DESTDIR/etc/lantern/keys.toml"
    [[ -n "$DESTDIR" ]] || chown lantern:lantern "$DESTDIR/etc/lantern/keys.toml"
    say "wrote /etc/lantern/keys.toml (mode 0600, owner lantern): add your nodes' keys"
fi
if [[ -z "$DESTDIR" && ! -d "$STATE" ]]; then  # systemd's StateDirectory= makes the same
    install -d -m 0700 -o lantern -g lantern "$STATE"
fi

check_config() {  # check-config of one lantern executable, as the service's user
    "${AS_LANTERN[@]}" "$1" gateway check-config --config "$DESTDIR$CONFIG" 2>&1
}

install_unit() {
    local tmp="$UNIT_PATH.tmp"
    install -d -m 0755 "$(dirname "$UNIT_PATH")"
    sed "s#/opt/lantern/bin/lantern#$LANTERN_BIN#g; s#/opt/lantern/share#$PREFIX/share#g" \
        "$UNIT_SRC" > "$tmp"
    chmod 0644 "$tmp"
    mv "$tmp" "$UNIT_PATH"
}

install_docs() {
    install -d -m 0755 "$DESTDIR$PREFIX/share/doc/lantern"
    install -m 0644 "${DOCS[@]}" "$DESTDIR$PREFIX/share/doc/lantern/"
    # the alert rules for the operator's Prometheus (rule_files:) and their unit tests
    # (docs/alerts.md): with the docs, so that --uninstall removes them with Lantern's docs
    install -d -m 0755 "$DESTDIR$PREFIX/share/doc/lantern/prometheus"
    install -m 0644 "${RULES[@]}" "$DESTDIR$PREFIX/share/doc/lantern/prometheus/"
}

verify_unit() {
    command -v systemd-analyze >/dev/null || return 0
    local check="$UNIT_PATH" tmp
    if [[ -n "$DESTDIR" && -x "$DESTDIR$LANTERN_BIN" ]]; then
        # staged: verify a copy whose ExecStart= points into the staging tree
        tmp="$(mktemp -d)"
        sed "s#$LANTERN_BIN#$DESTDIR$LANTERN_BIN#g" "$check" > "$tmp/$UNIT"
        check="$tmp/$UNIT"
    fi
    systemd-analyze verify "$check"
    say "systemd-analyze verify: $UNIT is clean"
}

next_steps() {
    cat <<EOF

Lantern gateway installed. Next:
  1. edit /etc/lantern/gateway.toml (serial port, upstream url) and /etc/lantern/keys.toml
  2. $LANTERN_BIN gateway check-config --config /etc/lantern/gateway.toml
  3. systemctl enable --now lantern-gateway
  4. systemctl status lantern-gateway     # the STATUS line: nodes seen, links, queue, upstream
     journalctl -u lantern-gateway -f
     status page: http://127.0.0.1:8470/   (from elsewhere: ssh -L 8470:127.0.0.1:8470 <gateway>)
EOF
}

if [[ -z "${RELEASE:-}" ]]; then  # LANTERN_BIN: lay out unit, config and docs only
    install_unit
    install_docs
    verify_unit
    next_steps
    exit 0
fi

# ------------------------------------------------------------------------ the new release
ROOT_DIR="$DESTDIR$PREFIX"
# the installed version's verdict on this config, taken before anything moves
old_ok=no
if [[ -x "$ROOT_DIR/bin/lantern" ]] && check_config "$ROOT_DIR/bin/lantern" >/dev/null; then
    old_ok=yes
fi
if [[ -f "$ROOT_DIR/pyvenv.cfg" ]]; then
    # an install from before releases/ (one virtualenv in PREFIX): set aside, back on failure
    say "moving the previous installation (a virtualenv in $PREFIX) to $PREFIX.legacy"
    rm -rf "$ROOT_DIR.legacy"
    mv "$ROOT_DIR" "$ROOT_DIR.legacy"
fi
OLD_TARGET="$(readlink "$ROOT_DIR/current" 2>/dev/null || true)"
NEW_TARGET="releases/$(basename "$RELEASE")"

restore_legacy() {
    if [[ -d "$ROOT_DIR.legacy" ]]; then
        rm -rf "$ROOT_DIR"
        mv "$ROOT_DIR.legacy" "$ROOT_DIR"
    fi
}

if [[ "$OLD_TARGET" == "$NEW_TARGET" && -x "$DESTDIR$RELEASE/bin/lantern" ]]; then
    say "Lantern $VERSION ($NEW_TARGET) is already the installed release: refreshing unit and docs"
else
    rm -rf "$DESTDIR$RELEASE"
    say "installing Lantern $VERSION for $ARCH into $RELEASE (from $HERE, no network)"
    "$PYTHON" -m venv --without-pip "$DESTDIR$RELEASE"
    pipwhl=("$HERE"/wheels/pip-*.whl)
    # pip runs from its own wheel in the bundle; PIP_CONFIG_FILE and --isolated leave out
    # any machine-wide pip config (indexes, find-links, constraints)
    if ! PIP_CONFIG_FILE=/dev/null "$DESTDIR$RELEASE/bin/python" "${pipwhl[0]}/pip" install \
            --isolated --disable-pip-version-check --no-cache-dir --no-warn-script-location \
            --quiet --no-index --find-links "$HERE/wheels" --require-hashes \
            -r "$HERE/requirements.txt"; then
        rm -rf "$DESTDIR$RELEASE"
        restore_legacy
        die "pip could not install the bundle (above); nothing was changed"
    fi
    got="$("$DESTDIR$RELEASE/bin/lantern" --version 2>&1 || true)"
    if [[ "$got" != "lantern $VERSION" ]]; then
        rm -rf "$DESTDIR$RELEASE"
        restore_legacy
        die "the new release does not run (\`lantern --version\` said: $got); nothing was changed"
    fi
fi

# ready, as far as the config goes: the new version must pass where the old one passed
if [[ -n "$DESTDIR" ]]; then
    NEW_CHECK="$DESTDIR$RELEASE/bin/lantern"
else
    NEW_CHECK="$RELEASE/bin/lantern"
fi
if ! out="$(check_config "$NEW_CHECK")"; then
    if [[ $old_ok == yes ]]; then
        [[ "$OLD_TARGET" == "$NEW_TARGET" ]] || rm -rf "$DESTDIR$RELEASE"
        restore_legacy
        printf '%s\n' "$out" >&2
        die "Lantern $VERSION fails check-config where the installed version passes (above):" \
            "rolled back, the installed version stays and runs on"
    fi
    say "warning: check-config fails (below); fix the config, then check it again:"
    printf '%s\n' "$out"
else
    say "check-config of Lantern $VERSION${AS_LANTERN:+ as user lantern}: OK"
fi

was_active=no
if systemd_up && systemctl is-active --quiet "$UNIT"; then
    was_active=yes
fi
old_unit="$(mktemp)"
[[ ! -e "$UNIT_PATH" ]] || cp -p "$UNIT_PATH" "$old_unit"

switch_to() {  # point current (and bin) at a release, atomically
    mkdir -p "$ROOT_DIR"
    ln -sfn "$1" "$ROOT_DIR/current.tmp"
    mv -T "$ROOT_DIR/current.tmp" "$ROOT_DIR/current"
    [[ -L "$ROOT_DIR/bin" ]] || ln -sfn current/bin "$ROOT_DIR/bin"
}

switch_to "$NEW_TARGET"
install_unit
install_docs
verify_unit

if systemd_up; then
    systemctl daemon-reload
    if [[ $was_active == yes ]]; then
        say "restarting $UNIT (it was running)"
        # Type=notify: restart returns once the gateway said READY=1, or fails
        if ! systemctl restart "$UNIT" || ! systemctl is-active --quiet "$UNIT"; then
            say "Lantern $VERSION did not become ready: rolling back" >&2
            journalctl -u "$UNIT" -n 20 --no-pager >&2 || true
            if [[ -n "$OLD_TARGET" ]]; then
                switch_to "$OLD_TARGET"
            else
                rm -f "$ROOT_DIR/current" "$ROOT_DIR/bin"
                restore_legacy
            fi
            [[ ! -s "$old_unit" ]] || cp -p "$old_unit" "$UNIT_PATH"
            systemctl daemon-reload
            systemctl restart "$UNIT" || true
            die "rolled back to the previous release; the new one is left in $RELEASE"
        fi
        say "$UNIT restarted and ready"
    fi
else
    say "systemd is not running here (PID 1 is $(pid1)): skipped daemon-reload, the restart" \
        "and the check that the service becomes ready; checked: lantern --version and" \
        "check-config${AS_LANTERN:+ as user lantern}"
fi
rm -f "$old_unit"

# keep the release now current and the one before it
for r in "$ROOT_DIR"/releases/*; do
    case "releases/$(basename "$r")" in
        "$NEW_TARGET" | "$OLD_TARGET") ;;
        *) rm -rf "$r" ;;
    esac
done
rm -rf "$ROOT_DIR.legacy"
say "Lantern $VERSION is the current release${OLD_TARGET:+ (the previous one, $OLD_TARGET, is kept for a rollback)}"
next_steps
