"""tools/field/diag_ble.py: what counts as a BLE address in `lantern diag node --ble TARGET`.

`^...$` with re.match also accepts a trailing newline ("AA:BB:CC:DD:EE:FF\\n"), the same
slip as the node-id pattern of review finding 9: such a target was taken as an address that
no device's address could ever equal. An address is exactly six hex pairs, nothing after.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lantern.agent.links.ble import node_tag
from lantern.agent.links.ble_session import SERVICE_UUID
from lantern.tools.field.diag_ble import ADDRESS, BleTransport

ADDR = "F0:00:00:00:00:77"


@pytest.mark.parametrize("text", [ADDR, ADDR.lower(), "00:11:22:33:44:55"])
def test_an_address_is_six_hex_pairs(text: str) -> None:
    assert ADDRESS.match(text)


@pytest.mark.parametrize("text", [ADDR + "\n", ADDR + "\r\n", ADDR + " ", "\n" + ADDR,
                                  ADDR + ":00", ADDR[:-1], ADDR.replace(":", "-"), "SL-0001"])
def test_nothing_before_or_after_an_address_is_accepted(text: str) -> None:
    assert ADDRESS.match(text) is None


def test_a_target_with_a_newline_is_not_taken_for_that_address() -> None:
    device = SimpleNamespace(address=ADDR)
    advert = SimpleNamespace(service_data={SERVICE_UUID: bytes(3) + node_tag("SL-0001")})
    assert BleTransport(ADDR)._matches(device, advert)  # type: ignore[arg-type]
    assert BleTransport("SL-0001")._matches(device, advert)  # type: ignore[arg-type]
    # not an address: looked up as a node id, which no node's advert carries
    assert not BleTransport(ADDR + "\n")._matches(device, advert)  # type: ignore[arg-type]
