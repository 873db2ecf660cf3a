"""The simulated street: MicroPython nodes on pseudo-terminals, fault injection, test upstreams
and the demo (`lantern sim`, `lantern demo`, `make reliability`)."""
