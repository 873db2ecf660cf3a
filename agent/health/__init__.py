"""Streetlight and node health at the gateway: lamp state and faults, sensor and node
conditions, energy and emissions, and alert delivery (docs/alerts.md)."""
