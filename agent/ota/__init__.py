"""Signed updates at the gateway: carrying bundles to nodes (transfer) and rolling them out."""
