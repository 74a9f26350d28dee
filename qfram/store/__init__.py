"""Snapshots for a fleet: an S3-compatible store, content-addressed and deduplicated.

``s3://BUCKET/NAME`` is the object ``NAME``: the snapshot's manifest
(qfram.format.manifest); its chunks live under ``.qfram/chunks/``, named by the SHA-256
of their bytes, so a chunk any snapshot stored is never uploaded again.

* push / remove (qfram.store.push), gc (qfram.store.gc), with locks that keep them safe
  from each other (qfram.store.locks);
* load (eager, into RAM), pull (into a local chunked snapshot), inspect
  (qfram.store.restore);
* lazy restores go through a host page server fed from the store
  (qfram.server.sources.StoreSource): a chunk fetcher with a local cache
  (qfram.store.chunks), the working set first.

The store is a hostile peer: every request is bounded and retried a bounded number of
times (qfram.store.client), everything it returns is checked before use.
"""
from qfram.store.gc import gc
from qfram.store.push import push, remove
from qfram.store.restore import inspect, load, open_manifest, pull
from qfram.store.url import Endpoint, is_url, parse_url

__all__ = ["push", "remove", "gc", "load", "pull", "inspect", "open_manifest", "Endpoint",
           "is_url", "parse_url"]
