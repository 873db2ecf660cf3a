#!/usr/bin/env bash
# Build MicroPython 1.25 (unix port + mpy-cross) from Debian trixie's source package.
# Leaves .build/micropython/unix/micropython and .build/micropython/mpy-cross.
# Cached: re-running after a successful build does nothing.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD="$ROOT/.build"
SRC_CACHE="$BUILD/src"
OUT="$BUILD/micropython"
VERSION="1.25.0+ds"
ORIG="micropython_${VERSION}.orig.tar.xz"
DEBTAR="micropython_${VERSION}-1.debian.tar.xz"
ORIG_SHA=7b25be99a502f070b2de81dafc08da7051d992325d6e67daa9045a918fffdbea
DEB_SHA=87cd89f7900c86b963885dabe25acf3e5348815993f1500278ad8f6464465af4
TREE="$BUILD/micropython-src"

if [[ -x "$OUT/unix/micropython" && -x "$OUT/mpy-cross" && -f "$OUT/.stamp-$VERSION" ]]; then
    exit 0
fi

mkdir -p "$SRC_CACHE/apt/lists/partial" "$OUT/unix"
cd "$SRC_CACHE"

if ! echo "$ORIG_SHA  $ORIG" | sha256sum -c --quiet 2>/dev/null \
   || ! echo "$DEB_SHA  $DEBTAR" | sha256sum -c --quiet 2>/dev/null; then
    echo "fetching Debian source package micropython $VERSION (private apt lists, system config untouched)"
    echo "deb-src http://deb.debian.org/debian trixie main" > apt/sources.list
    APT_OPTS=(-oDir::State::Lists="$SRC_CACHE/apt/lists"
              -oDir::Etc::SourceList="$SRC_CACHE/apt/sources.list"
              -oDir::Etc::SourceParts=/nonexistent
              -oAPT::Sandbox::User=root)
    apt-get "${APT_OPTS[@]}" update -qq
    apt-get "${APT_OPTS[@]}" source --download-only "micropython=${VERSION}-1" -qq
    echo "$ORIG_SHA  $ORIG" | sha256sum -c --quiet
    echo "$DEB_SHA  $DEBTAR" | sha256sum -c --quiet
fi

rm -rf "$TREE" "$TREE.tmp"
mkdir -p "$TREE.tmp"
tar -C "$TREE.tmp" -xf "$ORIG"
tar -C "$TREE.tmp/micropython-1.25.0" -xf "$DEBTAR"
mv "$TREE.tmp/micropython-1.25.0" "$TREE"
rm -rf "$TREE.tmp"

cd "$TREE"
# Debian's own patch series: system mbedtls (gives the unix port cryptolib), fixed version string.
while read -r p; do
    [[ -z "$p" || "$p" == \#* ]] && continue
    patch -p1 -s < "debian/patches/$p"
done < debian/patches/series

JOBS=$(nproc)
make -s -C mpy-cross -j"$JOBS"
make -s -C ports/unix -j"$JOBS" MICROPY_PY_BTREE=0 MICROPY_PY_SSL=1 MICROPY_SSL_AXTLS=0 \
    MICROPY_SSL_MBEDTLS=1 FROZEN_MANIFEST=

cp mpy-cross/build/mpy-cross "$OUT/mpy-cross"
cp ports/unix/build-standard/micropython "$OUT/unix/micropython"
# asyncio and the other pure-Python extmod packages, for MICROPYPATH when nothing is frozen
rm -rf "$OUT/extmod" && mkdir -p "$OUT/extmod" && cp -r extmod/asyncio "$OUT/extmod/asyncio"
touch "$OUT/.stamp-$VERSION"
"$OUT/unix/micropython" -c "import sys; print('built', sys.implementation)"
