"""Pushes and gc, each safe from the other: a push holds a *push lock* (an object under
``.qfram/locks/``) from before it decides which chunks exist until its manifest is in
place; gc holds a *gc lock* while it finds and removes unreferenced chunks.  Each writes
its own lock first, then looks for the other kind: a gc that finds a live push lock (or
a push that finds a gc lock) removes its own and waits or gives up with a reason — so a
chunk a push counts on is never removed under it.  S3 lists what was written before
(strong consistency, on AWS and the engines qfram is tested on), so two that start at
once both see the other and back off; one wins on the next try.

A lock is live while the store's clock says it was written (or refreshed, every
``REFRESH`` seconds by its holder) less than ``STALE`` seconds ago: a crashed push
blocks gc for that long at most.
"""
from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
import uuid
from typing import List, Optional

from qfram.errors import StoreError
from qfram.format.manifest import LOCK_PREFIX
from qfram.store.client import ObjectStore

STALE = 300.0
REFRESH = 30.0


class Lock:
    """Our lock of ``kind`` ("push" or "gc") in the bucket, held until release()."""

    def __init__(self, store: ObjectStore, kind: str, *, wait: float = 60.0,
                 stale: float = STALE) -> None:
        self.store = store
        self.kind = kind
        self.other = "gc" if kind == "push" else "push"
        self.key = f"{LOCK_PREFIX}{kind}-{uuid.uuid4().hex}"
        self.stale = stale
        self.wait = wait
        self._stop = threading.Event()
        self._refresher: Optional[threading.Thread] = None

    def _body(self) -> bytes:
        return json.dumps({"kind": self.kind, "host": socket.gethostname(),
                           "pid": os.getpid(), "written": time.time()}).encode()

    def live_others(self) -> List[str]:
        now = self.store.server_time()
        # (a listing's prefix is a folder for object_store: filter the names here)
        return [key for key, _, written in self.store.list(LOCK_PREFIX)
                if key.startswith(LOCK_PREFIX + self.other + "-")
                and now - written < self.stale]

    def acquire(self) -> "Lock":
        end = time.monotonic() + self.wait
        while True:
            self.store.put(self.key, self._body())
            others = self.live_others()
            if not others:
                break
            self.store.delete(self.key)
            if time.monotonic() > end:
                raise StoreError(f"{self.store.where()}: a {self.other} is under way "
                                 f"({others[0]}); gave up after {self.wait:g} s — try again "
                                 f"when it is done (a crashed one's lock goes stale after "
                                 f"{self.stale:g} s)")
            time.sleep(0.2 + random.random())
        self._refresher = threading.Thread(target=self._refresh, daemon=True,
                                           name=f"qfram-{self.kind}-lock")
        self._refresher.start()
        return self

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH):
            try:
                self.store.put(self.key, self._body())
            except StoreError:
                pass                          # the next try may do; staleness bounds it

    def release(self) -> None:
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join(5)
        try:
            self.store.delete(self.key)
        except StoreError:
            pass                              # it goes stale

    def __enter__(self) -> "Lock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()
