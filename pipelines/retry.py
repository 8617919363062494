"""Storage that rides through outages: transient errors retried with backoff, permanent ones at once.

A real S3 returns 503 SlowDown and resets connections routinely; a job that died 4 s into an outage cost a
10-hour run its restart. Every storage call the pipeline makes goes through `RetryingFS` (what
`pipelines.storage.filesystem` returns): transient errors (connection refused / reset, timeouts, 5xx,
SlowDown, throttling) are retried with exponential backoff and jitter until the budget (`RetryPolicy`:
attempts and seconds, from the spec's `storage.retry`) is spent; permanent ones (403, a missing bucket, bad
credentials, a missing key) fail at once. What still fails becomes `StorageError`: one line with the
operation, the URL, the attempts, the time spent and the underlying error; the CLI exits 3 with it.

Why not Ray Data's knobs: `DataContext.retried_io_errors` / `write_file_retry_on_errors` match the messages of
pyarrow's native S3 client, and every byte here goes through fsspec (pyarrow's S3 ignores AWS_ENDPOINT_URL, so it
cannot reach a MinIO or moto); Ray has no retry for fsspec calls, hence this one. `max_errored_blocks` stays 0 on
purpose: a skipped block is images silently missing from the output.
"""

from __future__ import annotations

import errno
import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from promptmill.pipelines.redaction import redact_text

log = logging.getLogger(__name__)
T = TypeVar("T")

_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                    "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequests",
                    "500", "502", "503", "504"}
_TRANSIENT_ERRNO = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT, errno.EPIPE, errno.ECONNABORTED,
                    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EAGAIN, getattr(errno, "EREMOTEIO", errno.EIO)}
_TRANSIENT_NAMES = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                    "ConnectionError", "ClientConnectorError", "ServerDisconnectedError", "ClientOSError",
                    "ServerTimeoutError", "TimeoutError", "IncompleteRead", "ResponseStreamingError",
                    "ClientPayloadError", "FSTimeoutError", "ProtocolError"}


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 10
    max_wait_s: float = 120.0
    base_s: float = 1.0
    cap_s: float = 20.0

    def delay(self, attempt: int) -> float:
        """Equal jitter: half of the exponential step fixed, half random, so the budget is a floor on how long an
        outage the job waits out (10 attempts: at least ~65 s) and parallel writers do not retry in step."""
        step = min(self.cap_s, self.base_s * 2 ** attempt)
        return step / 2 + random.uniform(0, step / 2)

    @classmethod
    def current(cls) -> RetryPolicy:
        """This process's policy (`use_policy`; the default otherwise)."""
        return _current[0]


_current = [RetryPolicy()]


def use_policy(policy: RetryPolicy) -> None:
    """The policy of every filesystem this process opens from now on without one of its own (the job's
    `storage.retry`, set once by the driver). A filesystem keeps the policy it was opened with, also on the Ray
    workers it is sent to: that is how a job's policy reaches them."""
    _current[0] = policy


class StorageError(RuntimeError):
    """A storage operation failed for good (transient past the budget); the message is one line."""


STORAGE_LINE = re.compile(r"storage: [A-Z]+ \S+(?: \(\+\d+ more\))? failed after \d+ attempts over \d+ s: [^\n]*")


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def transient(e: BaseException) -> bool:
    """Worth retrying: a connection or timeout problem, a 5xx, throttling; never 4xx, missing keys or auth."""
    for x in _chain(e):
        response = getattr(x, "response", None)
        if isinstance(response, dict) and "Error" in response:  # botocore ClientError
            code = str(response["Error"].get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return code in _TRANSIENT_CODES or (isinstance(status, int) and status >= 500)
        if isinstance(x, (PermissionError, FileNotFoundError, FileExistsError, IsADirectoryError,
                          NotADirectoryError)):
            return False
        if type(x).__name__ in _TRANSIENT_NAMES or isinstance(x, (ConnectionError, TimeoutError)):
            return True
        if isinstance(x, OSError) and x.errno in _TRANSIENT_ERRNO:
            return True
    return False


def short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 240 else text[:240] + "..."


def retrying(op: str, url: str, fn: Callable[[], T], policy: RetryPolicy | None = None) -> T:
    """`fn()`, retried while its errors are transient and the budget lasts."""
    policy = policy or RetryPolicy.current()
    t0, attempt = time.monotonic(), 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below; permanent errors re-raise unchanged
            if not transient(e):
                raise
            spent = time.monotonic() - t0
            wait = policy.delay(attempt)
            if attempt >= policy.attempts or spent + wait > policy.max_wait_s:
                raise StorageError(redact_text(f"storage: {op} {url} failed after {attempt} attempts over "
                                               f"{spent:.0f} s: {short(e)}")) from e
            log.warning("storage: %s %s: %s; retry %d/%d in %.1f s", op, redact_text(url), short(e), attempt,
                        policy.attempts - 1, wait)
            time.sleep(wait)


# fsspec calls that touch the store, and the word the error line uses for them
_OPS = {"pipe": "PUT", "pipe_file": "PUT", "put": "PUT", "put_file": "PUT", "cat": "GET", "cat_file": "GET",
        "get": "GET", "get_file": "GET", "open": "OPEN", "ls": "LIST", "find": "LIST", "glob": "LIST",
        "exists": "HEAD", "info": "HEAD", "isdir": "HEAD", "isfile": "HEAD", "size": "HEAD", "rm": "DELETE",
        "rm_file": "DELETE", "mv": "MOVE", "copy": "COPY", "makedirs": "MKDIR", "mkdir": "MKDIR"}


class RetryingFS:
    """An fsspec filesystem whose storage calls retry transient errors (attribute access passes through)."""

    def __init__(self, fs: Any, policy: RetryPolicy | None = None) -> None:
        self.__dict__["_fs"] = fs
        self.__dict__["_policy"] = policy or RetryPolicy.current()

    def __reduce__(self):  # travels to Ray workers with its policy (unpickling must not reach __getattr__)
        return RetryingFS, (self._fs, self._policy)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        attr = getattr(self._fs, name)
        if name not in _OPS or not callable(attr):
            return attr
        op = _OPS[name]

        def call(*args, **kwargs):
            target = args[0] if args else kwargs.get("path", "")
            if isinstance(target, dict):  # pipe({path: data, ...})
                target = f"{next(iter(target), '')} (+{len(target) - 1} more)" if len(target) > 1 else next(
                    iter(target), "")
            url = self._fs.unstrip_protocol(str(target)) if "file" not in self.protocols else str(target)
            return retrying(op, url, lambda: attr(*args, **kwargs), self._policy)

        return call

    @property
    def protocols(self) -> tuple:
        p = self._fs.protocol
        return p if isinstance(p, tuple) else (p,)

    @property
    def unwrapped(self) -> Any:
        return self._fs
