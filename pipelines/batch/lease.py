"""One writer per output: a lease object (`_lease.json`) created exclusively, renewed while the job runs.

Two runs of one output interleaved their commits: both numbered a WebDataset shard 00000, both removed the
shared `_staging/`, one wrote `_SUCCESS` with rows missing. The lease makes the second run wait or stop with
the owner's name. Creation is exclusive where the store allows it: `O_EXCL` on local disk, a conditional PUT
(`If-None-Match: *`) on S3. A lease is stale when its expiry has passed, or at once when its owner ran on this
host and that process is gone (a killed driver's rerun must not wait for the expiry).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from fsspec import AbstractFileSystem
from promptmill.pipelines.layout import LEASE
from promptmill.pipelines.storage import is_local_fs, join, put_atomic

log = logging.getLogger(__name__)


class LeaseHeld(RuntimeError):
    """Another live run holds the output; the message names it."""


@dataclass
class Holder:
    run: str
    host: str
    pid: int
    job: str
    expires: float

    def describe(self) -> str:
        left = self.expires - time.time()
        state = f"expires in {left:.0f} s" if left > 0 else "has expired"
        return f"run {self.run} (pid {self.pid} on {self.host}, job {self.job or '-'}; its lease {state})"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def create_exclusive(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `path` only if it does not exist (FileExistsError otherwise), atomically where the store can."""
    if is_local_fs(fs):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    else:
        fs.pipe_file(path, data, mode="create")  # s3fs: PutObject with If-None-Match: *


class Lease:
    def __init__(self, fs: AbstractFileSystem, root: str, ttl_s: float = 60.0, job: str = "") -> None:
        self.fs, self.path, self.ttl_s = fs, join(root, LEASE), ttl_s
        self.me = Holder(uuid.uuid4().hex[:12], socket.gethostname(), os.getpid(), job, 0.0)
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _payload(self) -> bytes:
        self.me.expires = time.time() + self.ttl_s
        return json.dumps(asdict(self.me)).encode()

    def holder(self) -> Holder | None:
        try:
            return Holder(**json.loads(self.fs.cat_file(self.path)))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):  # half-written or foreign: treat as expired
            return Holder("unreadable", "?", -1, "", 0.0)

    def _stale(self, h: Holder) -> bool:
        return h.expires < time.time() or (h.host == self.me.host and h.pid != self.me.pid and not _alive(h.pid))

    def acquire(self, wait_s: float = 0.0, poll_s: float = 2.0) -> Lease:
        deadline = time.time() + wait_s
        while True:
            try:
                create_exclusive(self.fs, self.path, self._payload())
                break
            except FileExistsError:
                h = self.holder()
                if h is None:
                    continue  # released between our attempt and our read
                if self._stale(h):
                    log.warning("taking over the stale lease of %s", h.describe())
                    self.fs.rm(self.path)
                    continue
                if time.time() >= deadline:
                    raise LeaseHeld(f"{self.path} is held by {h.describe()}") from None
                time.sleep(poll_s)
        self._thread = threading.Thread(target=self._renew, name="promptmill-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            h = self.holder()
            if h is None or h.run != self.me.run:
                log.error("lost the output lease to %s", h.describe() if h else "nobody (deleted)")
                self.lost.set()
                return
            put_atomic(self.fs, self.path, self._payload())  # a reader never sees half a lease (it would look stale)

    def check(self) -> None:
        """Raise if another run took the lease over (this one stalled past its expiry): do not commit."""
        if self.lost.is_set():
            raise LeaseHeld(f"{self.path}: this run lost its lease (stalled past the expiry?); nothing committed")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        h = self.holder()
        if h is not None and h.run == self.me.run:
            self.fs.rm(self.path)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
