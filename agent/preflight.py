"""What `lantern gateway run` will need from this machine, checked before it starts.

`check-config` reads the files; this looks at the machine: the state directory (a directory,
writable by the user that runs the check, on a filesystem that is not read-only, with room
for the queue), and the serial ports (a warning only: USB adapters come and go). Each finding
is one line that says what to fix; what cannot be checked from here is said too.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Below this much free space the queue cannot take a commit: the disk is full for Lantern.
MIN_FREE_BYTES = 4 << 20


@dataclass
class Findings:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def _existing(path: Path) -> Path:
    """The path itself, or its nearest ancestor that exists (the gateway creates the rest)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _unsearchable(path: Path) -> Path | None:
    """The first folder on the way to `path` that this user may not search, if any."""
    for p in (*reversed(path.parents), path):
        if not os.access(p, os.X_OK):
            return p
    return None


def check_state_dir(state_dir: Path, max_bytes: int | None, out: Findings) -> None:
    user = _user()
    try:
        if state_dir.exists() and not state_dir.is_dir():
            out.errors.append(f"{state_dir}: gateway.state_dir is a file, not a directory; "
                              "point state_dir at a directory (the gateway creates it)")
            return
        base = _existing(state_dir)
        if not base.is_dir():
            out.errors.append(f"{base}: is not a directory, so {state_dir} cannot be created")
            return
    except OSError as e:
        # a parent this user cannot search (the service's 0700 /var/lib/lantern, /root): the
        # gateway run as this user could not reach it either, so it is an error, not a guess
        blocked = _unsearchable(state_dir.parent) or state_dir
        out.errors.append(f"{state_dir}: cannot be checked as {user}: {blocked}: {e.strerror}; "
                          "run it as the unit's User= (e.g. `sudo -u lantern lantern "
                          f"gateway …`), or give {user} access to {blocked}")
        return
    try:
        st = os.statvfs(base)
    except OSError as e:
        out.unchecked.append(f"free space at {base} ({e.strerror})")
        return
    if st.f_flag & os.ST_RDONLY:
        out.errors.append(f"{base}: the filesystem is read-only; the queue needs a writable "
                          "state_dir")
        return
    if not os.access(base, os.W_OK | os.X_OK):
        what = "is not writable" if base == state_dir else f"is not writable, so {state_dir} " \
            "cannot be created"
        out.errors.append(f"{base}: {what} by {user}; give the service's user the directory "
                          f"(e.g. chown lantern: {base})")
        return
    free = st.f_bavail * st.f_frsize
    if free < MIN_FREE_BYTES:
        out.errors.append(f"{base}: {free >> 10} KiB free: the disk is full; the queue needs at "
                          f"least {MIN_FREE_BYTES >> 20} MiB (free space, or move state_dir)")
    elif max_bytes is not None and free < max_bytes:
        out.warnings.append(f"{base}: {free / (1 << 20):.0f} MiB free, less than [queue] max_mb "
                            f"({max_bytes / (1 << 20):g} MiB): the disk fills before the cap")
    if user != "lantern":
        out.unchecked.append(f"access as the service's user: checked as {user} (run the check "
                             "as the unit's User=, e.g. `sudo -u lantern lantern gateway "
                             "check-config …`)")


def check_state(state_dir: Path) -> list[str]:
    """The errors alone, for the gateway's start (check-config says the rest)."""
    out = Findings()
    check_state_dir(state_dir, None, out)
    return out.errors


def check(cfg: Any) -> Findings:
    out = Findings()
    queue = getattr(cfg, "queue", None)
    check_state_dir(Path(cfg.state_dir), queue.max_bytes if queue is not None else None, out)
    for link in cfg.links.get("serial", ()):
        if not Path(link.port).exists():
            out.warnings.append(f"{link.port}: no such serial port now (links.serial); the "
                                "gateway retries until it appears (is the adapter plugged in? "
                                "`ls /dev/serial/by-id/`)")
    if cfg.links.get("ble"):
        out.unchecked.append("the Bluetooth adapter (the BLE link says at start if BlueZ or "
                             "the adapter is missing)")
    out.unchecked.append("that the upstreams answer (after start: `lantern diag gateway`)")
    return out
