"""The simulated street's wire: one node's bus transactions over a Unix socket.

The simulated board's HAL (node/hal/unix.py) turns each machine.I2C/UART/ADC call into one
request; the street process (sim/serve.py) runs it on the chip models and answers. The chips
thus live outside the node's 110 KB heap, as they do outside a real ESP32.

request: op, bus index, address, register, bytes to read (u16), n data bytes (u16), data
reply:   errno (0: none), n data bytes (u16), data
"""

import struct

I2C_WRITE = 1
I2C_READ = 2
I2C_WRITE_MEM = 3
I2C_READ_MEM = 4
UART_WRITE = 5
UART_READ = 6
UART_ANY = 7
ADC_READ_UV = 8
I2C_SCAN = 9
REQUEST = "<BBBBHH"
REPLY = "<BH"
AF_UNIX = 1


def sockaddr(name):
    """A Linux abstract-namespace sockaddr_un: no file to clean up, no 108-byte path limit."""
    return struct.pack("H", AF_UNIX) + b"\0" + name.encode()


def bus_names(board):
    """Bus indexes on the wire: the board's bus names, sorted."""
    names = []
    for kind in ("i2c", "uart", "adc"):
        names.extend(board.get(kind, {}))
    return sorted(names)
