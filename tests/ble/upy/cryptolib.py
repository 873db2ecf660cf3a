"""MicroPython's `cryptolib` (the subset the firmware uses) for running firmware under CPython.

Only AES in ECB mode (mode 1), encrypt direction, as on the unix port and ESP32 builds: the
firmware's own AES-CCM (node/bthome.py) runs on top of it unchanged.
"""

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

MODE_ECB = 1


class aes:  # MicroPython's name
    def __init__(self, key: bytes, mode: int, iv: bytes | None = None) -> None:
        if mode != MODE_ECB:
            raise ValueError("mode")  # the unix port here only has ECB, like the firmware needs
        if len(key) not in (16, 32):
            raise ValueError("key")
        self._enc = Cipher(algorithms.AES(bytes(key)), modes.ECB()).encryptor()

    def encrypt(self, data: bytes, out: bytearray | None = None) -> bytes | None:
        if len(data) % 16:
            raise ValueError("blksize")
        result = self._enc.update(bytes(data))
        if out is None:
            return result
        out[:] = result
        return None
