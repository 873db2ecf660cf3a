"""A signed update on the QEMU image: the node frozen into the Cortex-M3 firmware, with its
ESP32-sized heap, takes a release from the real gateway process (`lantern gateway rollout`),
reboots into the new slot on its littlefs (a soft reset: the flash stays) and confirms it once
a pack of the new boot is ACKed.

The slot goes first on sys.path (main.py), ahead of the frozen `node` package, so the code that
runs after the switch is the bundle's .mpy, not the image's.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from lantern.tools.street.sim import ROOT

from .harness.ota import (
    Releases,
    api_json,
    free_port,
    gateway_extra,
    gateway_up,
    rollout_cli,
    rollout_finished,
)
from .harness.qemu import QEMU_BOARD, QEMU_IMAGE, QemuNode, QemuTopology, heap_stats, missing_tools

pytestmark = [pytest.mark.ota, pytest.mark.qemu]

TRIAL_S = 120  # a QEMU board samples slowly (its buses are round trips to the host)


class OtaQemuNode(QemuNode):
    """A QEMU board provisioned with the release key as well: release.pub beside node.json."""

    def write_config(self) -> Path:
        cfg = super().write_config()
        shutil.copyfile(self.dir / "release.pub", self.device_dir / "release.pub")
        return cfg

    async def mpremote(self, *args: str, timeout: float = 60) -> str:
        if args[:2] == ("fs", "cp") and ":node.json" in args:  # the provisioning copy
            args = (*args, "+", "fs", "cp", str(self.device_dir / "release.pub"),
                    ":release.pub")
        return await super().mpremote(*args, timeout=timeout)


@pytest.fixture(scope="module")
def image() -> Path:
    """The image with this firmware frozen in (scripts/build-qemu-image.sh: incremental)."""
    assert not missing_tools(), f"{missing_tools()} not installed: `make qemu-image`"
    build = subprocess.run([str(ROOT / "scripts/build-qemu-image.sh")], capture_output=True,
                           text=True, timeout=600)
    assert build.returncode == 0, f"image build failed:\n{build.stdout}\n{build.stderr}"
    return QEMU_IMAGE


@pytest.fixture(scope="module")
def rel(tmp_path_factory: pytest.TempPathFactory) -> Releases:
    return Releases(tmp_path_factory.mktemp("release"), [QEMU_BOARD])


@pytest.mark.timeout(900)
async def test_a_qemu_node_updates_from_the_gateway_and_confirms_the_new_slot(
        tmp_path: Path, rel: Releases, image: Path) -> None:
    port = free_port()
    topo = QemuTopology(tmp_path, n_nodes=1, interval_ms=1000, release_pub=rel.pub,
                        node_class=OtaQemuNode, node_extra={"update_trial_s": TRIAL_S},
                        gateway_extra=gateway_extra(rel.pub_pem, port, canary=1, step=1,
                                                    node_timeout_s=400))
    try:
        await topo.start()
        node = topo.qemu_nodes()[0]
        api = f"http://127.0.0.1:{port}/"
        await gateway_up(topo, api)
        await topo.wait_for(lambda: len(topo.sampled(node)) >= 2, 60, "the first packs")
        bundle = rel.save("2.0.0.lub", rel.build("2.0.0", floor=1))
        code, out, err = await rollout_cli(api, "start", str(bundle))
        assert code == 0, (out, err)
        try:
            st = await rollout_finished(topo, api, 400)
        finally:
            (tmp_path / "console.txt").write_bytes(node.output())
        text = node.output().decode(errors="replace")
        ro = st["rollout"]
        assert ro["state"] == "done", (ro, text[-3000:], topo.gateway_log()[-3000:])
        # the image booted once with its frozen release, then the bundle's from the slot
        boots = re.findall(r"lantern node SL-0001 firmware (\S+):", text)
        assert boots[0] != "2.0.0" and boots[-1] == "2.0.0", boots
        assert "update: release 2.0.0 confirmed, security floor 1" in text, text[-3000:]
        ran = text[text.index("lantern node "):]  # (provisioning probes the REPL before)
        assert "Traceback" not in ran and "MemoryError" not in ran, ran[-3000:]
        free = [int(x) for x in re.findall(r"update: checking an offer, heap free (\d+)", text)]
        assert free, text[-3000:]
        # the code that runs is the slot's .mpy, not the frozen package
        out = await node.mpremote("resume", "exec",
                                  "import sys, node.app as a; print('FILE', a.__file__, sys.path)")
        m = re.search(r"FILE (\S+) (.*)", out)
        assert m and m.group(1).startswith("state/fw/a/node/app"), out
        hs = await heap_stats(node)
        status: dict[str, Any] = await api_json(api, "api/rollout")
        print(f"QEMU update: offer check started with {min(free)} B free; since power-on, "
              f"heap high-water {hs.high_water} B and largest live set {hs.live_peak} B of "
              f"{hs.size} B; sys.path after the switch {m.group(2)}; "
              f"rollout {status['rollout']['state']}")
    finally:
        await topo.stop()
