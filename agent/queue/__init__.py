"""The gateway's durable queue and its way out: frames in once, on disk, then forwarded.

One writer puts frames in: ingest (agent/ingest.py) group-commits every frame a node sent and
every reading the gateway made from a third-party advert, under the same pause-intake hold,
and acknowledges the nodes' frames after the commit. One stage takes them out — forward:
committed frames read in whole-frame batches, resolved to SenML-JSON, handed to each sink, and
deleted once every sink confirmed them.

- store.py — `Store`: the SQLite queue on its own thread; the ACK path's commit, the replay
  windows, the views the local API reads
- layout.py — the file's tables, its layout number, and the layouts it is moved from
- diskcap.py — the bound on its bytes on disk and the policy when full
- history.py — recent readings kept after delivery, for the local API and the status page
- forward.py — the forward stage per sink (`Forwarder`: batch age and size, retry, backoff)
- batches.py — the forward stage on the store's thread: batches, the history's feed, deletion
- resolve.py — a frame as SenML-JSON (`resolve`, `Batch`: what a sink is handed)

Import the modules themselves (`from lantern.agent.queue.store import Store`): this file
loads nothing, so a sink that needs only `Batch` does not load the store.
"""
