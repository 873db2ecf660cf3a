"""A simulated street for the simulated boards (never deployed to a device).

Register-level models of each sensor chip sit on a simulated I2C bus, UART and ADC with
machine.I2C/UART/ADC's methods, so the real drivers run unchanged; a seeded scenario drives
them (scenario.py) and injects faults. MicroPython-compatible, like the firmware.
"""
