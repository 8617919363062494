"""One writer per output: a lease object (`_lease.json`) changed only by compare-and-swap, with a fencing token.

Two runs of one output interleaved their commits: both numbered a WebDataset shard 00000, both removed the
shared `_staging/`, one wrote `_SUCCESS` with rows missing. The lease makes the second run wait or stop with
the owner's name, and keeps a run that stalled past its expiry from writing over its successor:

- creation is exclusive (`O_EXCL` locally, `If-None-Match: *` on S3); a stale lease is taken over, and a live
  one renewed, only by compare-and-swap on the version that was read (`If-Match` on the ETag on S3; under
  `flock` on local disk), so of two contenders exactly one wins;
- each holder has a fencing token (`<generation>.<run>`, the generation one above the lease it replaced); the
  job's workers put it in every staged part's name, and the commit takes only its own token's parts and the
  parts it adopted when it took the lease, so a stale writer's late parts are never committed;
- any renewal failure marks the lease lost, and `check()` renews synchronously (a CAS that proves the lease is
  still ours right now): the job calls it before the commit, before deleting old parts and before `_SUCCESS`.

A lease is stale when its expiry has passed, or at once when its owner ran on this host in this PID namespace
and that process is gone (a killed driver's rerun must not wait for the expiry; containers sharing a hostname
have their own PIDs, so a PID elsewhere proves nothing).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

from fsspec import AbstractFileSystem
from promptmill.pipelines.layout import LEASE, part_token
from promptmill.pipelines.storage import is_local_fs, join, put_atomic

log = logging.getLogger(__name__)


class LeaseHeld(RuntimeError):
    """Another live run holds the output (the message names it), or this run no longer holds it."""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


@dataclass
class Holder:
    run: str
    host: str
    pid: int
    job: str
    expires: float
    generation: int = 1
    pidns: str = ""

    @property
    def token(self) -> str:
        """The fencing token: what the run's staged parts carry, and the commit checks."""
        return f"{self.generation}.{self.run}"

    def describe(self) -> str:
        left = self.expires - time.time()
        state = f"expires in {left:.0f} s" if left > 0 else "has expired"
        return f"run {self.run} (pid {self.pid} on {self.host}, job {self.job or '-'}; its lease {state})"

    @classmethod
    def parse(cls, data: bytes) -> Holder:
        try:
            raw = json.loads(data)
            return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})
        except (ValueError, TypeError, KeyError):  # half-written or foreign: treat as expired
            return cls("unreadable", "?", -1, "", 0.0)


@dataclass(frozen=True)
class Fence:
    """What the commit needs of the lease: which staged parts are this run's to commit (its own token's, and those
    it listed after taking the lease, before drawing) and checks that the lease is still its own."""

    token: str
    adopted: frozenset[str]
    check: Callable[[], None]  # a synchronous renewal: before the commit, before old parts go, before _SUCCESS
    guard: Callable[[], None]  # cheap, before every other write of the commit

    def accepts(self, path: str) -> bool:
        return part_token(path) == self.token or path in self.adopted


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def create_exclusive(fs: AbstractFileSystem, path: str, data: bytes) -> str:
    """Write `path` only if it does not exist (FileExistsError otherwise); returns its version (see `Lease`)."""
    if is_local_fs(fs):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"  # whole before it has the name: a reader never sees it empty
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)  # fails if the name exists
        finally:
            os.unlink(tmp)
        return data.decode()
    try:
        out = fs.pipe_file(path, data, mode="create")  # s3fs: PutObject with If-None-Match: *
    except OSError as e:
        if isinstance(e, FileExistsError) or _precondition_failed(e):  # some stores answer 412 without a condition
            raise FileExistsError(path) from e
        raise
    return _etag(out) or data.decode()


def _etag(response: object) -> str | None:
    return response.get("ETag") if isinstance(response, dict) else None


def _precondition_failed(e: BaseException) -> bool:
    """S3's 412 (a condition did not hold), which s3fs raises as OSError(EINVAL)."""
    text = f"{type(e).__name__} {e} {e.__cause__ or ''}".lower()
    return (not isinstance(e, FileNotFoundError)
            and (getattr(e, "errno", None) == errno.EINVAL or "precondition" in text or "pre-condition" in text))


class Lease:
    """`version` is what compare-and-swap compares: the object's ETag on S3, its content elsewhere."""

    def __init__(self, fs: AbstractFileSystem, root: str, ttl_s: float = 60.0, job: str = "") -> None:
        self.fs, self.path, self.ttl_s = fs, join(root, LEASE), ttl_s
        self.me = Holder(uuid.uuid4().hex[:12], socket.gethostname(), os.getpid(), job, 0.0, 1, _pid_namespace())
        self.version: str | None = None
        self.lost = threading.Event()
        self._renewed = time.monotonic()  # when this run last proved the lease its own
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the renew thread and check() swap one version
        self._thread: threading.Thread | None = None
        self._s3 = "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))

    @property
    def token(self) -> str:
        return self.me.token

    def _payload(self) -> bytes:
        self.me.expires = time.time() + self.ttl_s
        return json.dumps(asdict(self.me)).encode()

    # -- the store's compare-and-swap ------------------------------------------------------------------------
    def _read(self) -> tuple[Holder | None, str | None]:
        """(holder, version) read together; (None, None) when there is no lease."""
        for attempt in range(3):
            try:
                if self._s3:
                    self.fs.invalidate_cache(self.path)
                    with self.fs.open(self.path, "rb") as f:  # s3fs reads with If-Match on the ETag it saw
                        data, version = f.read(), f.details.get("ETag")
                    return Holder.parse(data), version
                data = self.fs.cat_file(self.path)
                return Holder.parse(data), data.decode(errors="replace")
            except FileNotFoundError:
                return None, None
            except OSError as e:  # s3fs' FileExpired: it changed between the HEAD and the GET; read it again
                if attempt == 2 or "FileExpired" not in type(e).__name__ and "changed" not in str(e):
                    raise
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def _local_lock(self):
        fs = getattr(self.fs, "unwrapped", self.fs)  # the RetryingFS's own filesystem
        lock = f"{fs._strip_protocol(self.path)}.lock"
        with open(lock, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _swap(self, expected: str, data: bytes) -> str | None:
        """Replace the lease with `data` if it is still at version `expected`; the new version, or None."""
        if self._s3:
            try:
                return _etag(self.fs.pipe_file(self.path, data, IfMatch=expected)) or data.decode()
            except OSError as e:
                if not (isinstance(e, FileNotFoundError) or _precondition_failed(e)):  # gone, or changed: lost
                    raise
                h, version = self._read()  # a retried PUT that had gone through reads back as ours
                mine = Holder.parse(data)
                return version if h is not None and (h.run, h.expires, h.generation) == (
                    mine.run, mine.expires, mine.generation) else None
        if is_local_fs(self.fs):
            with self._local_lock():
                _, now = self._read()
                if now != expected:
                    return None
                put_atomic(self.fs, self.path, data)  # a reader never sees half a lease
                return data.decode()
        _, now = self._read()  # another store: read-compare-write, the best it allows
        if now != expected:
            return None
        self.fs.pipe_file(self.path, data)
        return data.decode()

    def _delete(self, expected: str) -> None:
        if self._s3:
            bucket, key, _ = self.fs.split_path(self.path)
            with contextlib.suppress(OSError):
                self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=expected)
            return
        with self._local_lock() if is_local_fs(self.fs) else contextlib.nullcontext():
            if self._read()[1] == expected:
                self.fs.rm(self.path)

    # -- the lease ---------------------------------------------------------------------------------------------
    def _stale(self, h: Holder) -> bool:
        here = h.host == self.me.host and h.pidns == self.me.pidns and bool(h.pidns)
        return h.expires < time.time() or (here and h.pid != self.me.pid and not _alive(h.pid))

    def acquire(self, wait_s: float = 0.0, poll_s: float = 2.0) -> Lease:
        deadline = time.time() + wait_s
        while True:
            try:
                self.me.generation = 1
                self.version = create_exclusive(self.fs, self.path, self._payload())
                break
            except FileExistsError:
                h, version = self._read()
                if h is None:
                    continue  # released between our attempt and our read
                if h.run == self.me.run:  # our own create, retried after it had gone through
                    self.version = version
                    break
                if self._stale(h):
                    self.me.generation = max(h.generation, 0) + 1
                    self.version = self._swap(version, self._payload())
                    if self.version is not None:
                        log.warning("took over the stale lease of %s (fencing token %s)", h.describe(), self.token)
                        break
                    time.sleep(0.2)  # another contender swapped first: read again
                    continue
                if time.time() >= deadline:
                    raise LeaseHeld(f"{self.path} is held by {h.describe()}") from None
                time.sleep(poll_s)
        self._renewed = time.monotonic()
        self._thread = threading.Thread(target=self._renew, name="promptmill-lease", daemon=True)
        self._thread.start()
        return self

    def _renew_once(self) -> None:
        """Extend the lease by CAS on the version we wrote; LeaseHeld (and `lost` set) when that fails."""
        with self._lock:
            if self.lost.is_set():
                raise LeaseHeld(f"{self.path}: this run lost its lease; nothing more is committed")
            try:
                version = self._swap(self.version, self._payload())
            except Exception as e:
                self.lost.set()
                raise LeaseHeld(f"{self.path}: renewing this run's lease failed ({type(e).__name__}: {e}); "
                                "stopping before anything more is committed") from e
            if version is None:
                self.lost.set()
                h, _ = self._read()
                raise LeaseHeld(f"{self.path}: this run lost its lease to "
                                f"{h.describe() if h else 'nobody (deleted)'} (stalled past its expiry?)")
            self.version = version
            self._renewed = time.monotonic()

    def guard(self) -> None:
        """Cheap, before each write of the commit: LeaseHeld once the lease is lost, or when this run has not
        renewed it for two thirds of its life (stalled, or the store unreachable: a successor may be taking
        over), so a run that lost it stops between writes rather than after the commit."""
        if self.lost.is_set() or time.monotonic() - self._renewed > self.ttl_s * 2 / 3:
            raise LeaseHeld(f"{self.path}: this run may have lost its lease (not renewed for "
                            f"{time.monotonic() - self._renewed:.0f} s of its {self.ttl_s:.0f} s life); stopping "
                            "before it writes more")

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self._renew_once()
            except LeaseHeld as e:
                log.error("%s", e)
                return

    def fence(self, staged: list[str]) -> Fence:
        """The fence for a run that listed `staged` (the staged parts it adopts) after taking this lease."""
        return Fence(self.token, frozenset(staged), self.check, self.guard)

    def check(self) -> None:
        """Prove the lease is still this run's, now (a synchronous renewal); LeaseHeld if not. Before each step
        that changes committed data."""
        self._renew_once()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            try:
                h, version = self._read()
                if h is not None and h.run == self.me.run and version is not None:
                    self._delete(version)
            except OSError as e:  # the job's outcome stands; the lease expires on its own
                log.warning("could not release %s (%s); it expires in %.0f s", self.path, e, self.ttl_s)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
