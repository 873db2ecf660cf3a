"""What the HIL tests run on: topologies of nodes, gateway and upstream, QEMU, Chromium."""
