"""HTTP transfer machinery the download sources share: retries and per-request deadlines.

A request is retried on a transient failure (:data:`TRANSIENT_ERRORS`: a dropped
connection, a timeout, HTTP 5xx or 429, a damaged download) with exponential backoff,
waiting longer when the server asks to (``Retry-After``). Besides the ``timeout_s`` that
requests applies (to connect, and between received bytes), a request has a deadline of
``timeout_s`` plus its expected size at ``min_rate_kbps``, so a server trickling bytes
cannot hang a download; one past its deadline is a :class:`TooSlowError`, retried too.

Each source passes its params prefix (``data.idc``, ``data.tcia``) and its error class,
so the messages name the keys the user can change.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable, TypeVar

import requests
from urllib3.exceptions import DecodeError, HTTPError, ProtocolError, ReadTimeoutError
from urllib3.exceptions import SSLError as Urllib3SSLError

LOG = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
# The longest wait a server's Retry-After can impose before a retry.
MAX_RETRY_AFTER_S = 600.0
# A request may take timeout_s + its expected bytes at this many kilobits per second.
DEFAULT_MIN_RATE_KBPS = 256.0

T = TypeVar("T")


class TransientError(Exception):
    """A failure worth retrying: HTTP 5xx or 429, or a download that arrived damaged or too slowly."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TooSlowError(TransientError):
    """A request ran past its deadline (slower on average than the source's ``min_rate_kbps``)."""


TRANSIENT_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
    TransientError,
)


class RetryPolicy:
    """Call a function, retrying transient failures with exponential backoff.

    Attempt ``n`` (from 0) that fails is followed by a wait of ``backoff_s * 2**n`` seconds,
    or the server's ``Retry-After`` if longer (at most :data:`MAX_RETRY_AFTER_S`). When the
    last of ``retries + 1`` attempts fails, ``error`` is raised with a message naming the
    source's keys under ``params_prefix`` (and ``also_check``, a key worth checking first).
    """

    def __init__(self, retries: int, backoff_s: float, params_prefix: str,
                 error: type[Exception] = RuntimeError, also_check: str = "",
                 sleep: Callable[[float], Any] = time.sleep):
        if retries < 0 or backoff_s < 0:
            raise ValueError(f"retries ({retries}) and backoff_s ({backoff_s}) must not be negative")
        self.retries = retries
        self.backoff_s = backoff_s
        self.params_prefix = params_prefix
        self.error = error
        self.also_check = also_check
        self.sleep = sleep

    def __call__(self, what: str, action: Callable[[], T]) -> T:
        attempts = self.retries + 1
        for attempt in range(attempts):
            try:
                return action()
            except TRANSIENT_ERRORS as exc:
                if attempt == attempts - 1:
                    raise self.error(
                        f"{what} failed after {attempts} attempt(s): {exc}. Series verified so far "
                        "are kept, so rerunning the download stage resumes; if it keeps failing, "
                        f"{self._advice(exc)}"
                    ) from exc
                delay = self.backoff_s * 2**attempt
                retry_after = getattr(exc, "retry_after_s", None)
                if retry_after is not None:
                    delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))
                LOG.warning("%s: attempt %d of %d failed (%s); retrying in %.1f s",
                            what, attempt + 1, attempts, exc, delay)
                self.sleep(delay)
        raise AssertionError("unreachable: the loop returns or raises")

    def _advice(self, exc: Exception) -> str:
        prefix = self.params_prefix
        # A TooSlowError's own message already says to lower min_rate_kbps.
        knobs = f"{prefix}.retries" if isinstance(exc, TooSlowError) else f"{prefix}.retries / {prefix}.timeout_s"
        check = f"check your connection and {self.also_check}," if self.also_check else "check your connection"
        return f"{check} or raise {knobs}"


def transfer_deadline_s(expected_bytes: int, min_rate_kbps: float, base_s: float) -> float | None:
    """Seconds a request may take: ``base_s`` plus ``expected_bytes`` at ``min_rate_kbps``
    kilobits (1000 bits) per second; None when ``min_rate_kbps`` is 0 (no deadline)."""
    if min_rate_kbps <= 0:
        return None
    return base_s + expected_bytes * 8 / (min_rate_kbps * 1000)


class Deadline:
    """The deadline of one request, started before it is sent; :meth:`check` raises
    :class:`TooSlowError` once it has passed, naming the bytes, the rate and the keys
    ``<params_prefix>.min_rate_kbps`` and ``<params_prefix>.timeout_s``."""

    def __init__(self, started: float, base_s: float, min_rate_kbps: float, expected_bytes: int,
                 params_prefix: str):
        self.started = started
        self.min_rate_kbps = min_rate_kbps
        self.expected_bytes = expected_bytes
        self.params_prefix = params_prefix
        self.allowed_s = transfer_deadline_s(expected_bytes, min_rate_kbps, base_s)
        self.received = 0

    def add(self, size: int) -> None:
        self.received += size
        self.check()

    def check(self) -> None:
        if self.allowed_s is None:
            return
        elapsed = time.monotonic() - self.started
        if elapsed <= self.allowed_s:
            return
        rate_kbps = self.received * 8 / 1000 / elapsed
        rate_key = f"{self.params_prefix}.min_rate_kbps"
        raise TooSlowError(
            f"too slow: {self.received:,} of about {self.expected_bytes:,} bytes in {elapsed:.1f} s "
            f"({rate_kbps:.1f} kbps on average), past the {self.allowed_s:.1f} s allowed for this size at "
            f"{rate_key} = {self.min_rate_kbps:g} kbps (plus {self.params_prefix}.timeout_s); if your "
            f"connection is this slow, lower {rate_key} (0: no deadline)"
        )


def declared_length(response: requests.Response) -> int | None:
    """The body's Content-Length, if declared for an unencoded body."""
    declared = response.headers.get("Content-Length", "")
    identity = response.headers.get("Content-Encoding", "identity").lower() == "identity"
    return int(declared) if identity and declared.isdigit() else None


def retry_after_s(response: requests.Response) -> float | None:
    """The response's ``Retry-After`` in seconds; None when absent or an HTTP date."""
    value = response.headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # use the exponential backoff


def iter_body(response: requests.Response, deadline: Deadline, chunk_bytes: int = CHUNK_BYTES) -> Iterable[bytes]:
    """The body of a streamed response as it arrives, checking ``deadline`` after each read.

    Unlike ``iter_content(n)``, which waits for ``n`` bytes (or the end), each read returns
    whatever has arrived, so a server sending a few bytes at a time cannot outlast the
    deadline by more than ``timeout_s``. urllib3's errors become the ones requests raises.
    """
    deadline.check()
    read1 = getattr(response.raw, "read1", None)
    try:
        if read1 is None:  # urllib3 < 2: whole chunks, checked in between
            for block in response.raw.stream(chunk_bytes, decode_content=True):
                yield block
                deadline.add(len(block))
            return
        while True:
            block = read1(chunk_bytes, decode_content=True)
            if not block:
                return
            yield block
            deadline.add(len(block))
    except ProtocolError as exc:  # incl. IncompleteRead: the connection closed early
        raise requests.exceptions.ChunkedEncodingError(exc) from exc
    except DecodeError as exc:
        raise requests.exceptions.ContentDecodingError(exc) from exc
    except ReadTimeoutError as exc:
        raise requests.exceptions.ConnectionError(exc) from exc
    except Urllib3SSLError as exc:
        raise requests.exceptions.SSLError(exc) from exc
    except HTTPError as exc:  # any other failure of the connection
        raise requests.exceptions.ConnectionError(exc) from exc


def read_head(response: requests.Response, deadline: Deadline, limit: int) -> bytes:
    """The first ``limit`` bytes of a streamed body (an error's), read within ``deadline``."""
    head = bytearray()
    for block in iter_body(response, deadline):
        head += block
        if len(head) >= limit:
            break
    return bytes(head[:limit])
