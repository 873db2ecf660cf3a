"""Entry point: `micropython main.py node.json` on the unix port; main.py on a device."""

import sys

from node import app

app.main(sys.argv[1] if len(sys.argv) > 1 else "node.json")
