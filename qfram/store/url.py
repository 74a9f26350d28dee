"""Where a snapshot lives in a store: ``s3://BUCKET/NAME``, and how to reach the store —
the endpoint and keys every S3 tool reads (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``), or given explicitly."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional

from qfram.errors import OptionError
from qfram.format.manifest import check_name

SCHEME = "s3://"
# S3's bucket names (and the looser ones local engines accept: no dots rule enforced)
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-_]{1,61}[a-z0-9]\Z")


def is_url(text: str) -> bool:
    return text.startswith(SCHEME)


@dataclass(frozen=True)
class StoreURL:
    bucket: str
    name: str                         # "" for the bucket itself (gc)

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.name}"


def parse_url(text: str, want_name: bool = True) -> StoreURL:
    """``s3://BUCKET/NAME`` (or, ``want_name`` False, ``s3://BUCKET``)."""
    if not is_url(text):
        raise OptionError(f"not an s3:// URL: {text!r}")
    bucket, _, name = text[len(SCHEME):].partition("/")
    if not _BUCKET.match(bucket):
        raise OptionError(f"{text!r}: {bucket!r} is not a bucket name")
    if want_name:
        if not name:
            raise OptionError(f"{text!r} names no snapshot: s3://BUCKET/NAME")
        try:
            check_name(name)
        except ValueError as exc:
            raise OptionError(f"{text!r}: {exc}") from None
    elif name:
        raise OptionError(f"{text!r}: give the bucket alone (s3://BUCKET)")
    return StoreURL(bucket, name)


@dataclass(frozen=True)
class Endpoint:
    """How to reach the store.  Unset fields come from the environment, as every S3
    tool reads it; plain http is allowed (a local store)."""

    url: Optional[str] = None
    access_key: Optional[str] = None
    secret_key: Optional[str] = None
    region: Optional[str] = None
    timeout: float = 10.0             # each connect, each read
    deadline: float = 60.0            # each request, its retries included

    def resolved(self) -> "Endpoint":
        env = os.environ
        return Endpoint(self.url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
                        self.access_key or env.get("AWS_ACCESS_KEY_ID"),
                        self.secret_key or env.get("AWS_SECRET_ACCESS_KEY"),
                        self.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
                        or "us-east-1", self.timeout, self.deadline)

    def describe(self) -> str:
        return self.resolved().url or "AWS S3"
