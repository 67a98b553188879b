"""The Tanium API key, read again when `tanium.api_key_file` changes, and whether Tanium accepts it.

Rotation without a restart. Kubernetes updates a mounted Secret in place: it writes the new files
into a fresh timestamped directory and swaps the `..data` symlink, so the key file keeps its path
while the file behind it changes. Before each request `current()` compares the resolved file's
(device, inode, mtime, size) with the last read's and reads the file again when they differ: a stat costs
microseconds against a request's milliseconds, and the next request already carries the new key.
A change the stamp cannot show (a same-size rewrite within one tick of a coarse clock) is caught by
`reload()`, which the client calls after a 401 and which always reads the content.

An empty or unreadable file on a re-read keeps the last good key: a half-written file or a Secret
being replaced must not stop the pipeline. It is logged once (until a good read) and counted.

Every new key is handed to the callbacks registered with `on_new_key` before it is used, so the
log filter masks it (the CLI registers its filter; this module knows nothing of logging setup).
A key is never logged, put in a message or a metric.

Standing: `rejected()` / `accepted()` track a streak of 401s (after the re-read) for the
`source_unauthorized` gauge and log its first 401 once, with the expiry/trusted-IP hint, and its end.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from connector.metrics import NO_METRICS, Metrics

log = logging.getLogger(__name__)

_new_key_callbacks: list[Callable[[str], None]] = []


def on_new_key(callback: Callable[[str], None]) -> None:
    """Call `callback(key)` with every key an ApiKey takes from a file from now on, before its use."""
    if callback not in _new_key_callbacks:
        _new_key_callbacks.append(callback)


class ApiKey:
    """One pipeline's API key: `value` from the configuration, followed by the file at `path` if any."""

    def __init__(self, value: str, path: str | None = None, metrics: Metrics = NO_METRICS):
        self.path = path
        self._value = value
        self._known = [value]  # every key held: messages are scrubbed of old ones too
        self._stamp: tuple | None = None  # of the file when last read (None: missing, or not read yet)
        self._file_ok = True
        self._rejected = 0  # requests answered 401 in the current streak
        self._lock = threading.Lock()
        self._m = metrics

    def current(self) -> str:
        """The key to send: the file's, if it changed since it was last read."""
        path = self.path
        if path is not None:
            stamp = _stamp(path)
            if stamp != self._stamp:
                with self._lock:
                    if stamp != self._stamp:
                        self._read(path, stamp)
        return self._value

    def reload(self) -> str:
        """Reads the file now, whatever its stamp says (after a 401), and returns the key to send."""
        path = self.path
        if path is not None:
            with self._lock:
                self._read(path, _stamp(path))
        return self._value

    def scrub(self, text: str) -> str:
        for key in self._known:
            text = text.replace(key, "***")
        return text

    def rejected(self, message: str) -> None:
        """Tanium answered 401 to the current key (already re-read): a streak starts or goes on."""
        with self._lock:  # the gauge under the lock: a concurrent accepted() cannot leave it stale
            self._rejected += 1
            first = self._rejected == 1
            self._m.auth_failures.labels(self._m.pipeline).inc()
            self._m.unauthorized.labels(self._m.pipeline).set(1)
        if first:
            where = f"after re-reading tanium.api_key_file {self.path!r}" if self.path else "(tanium.api_key)"
            log.error("%s Tanium rejects the key %s; logged once until it accepts one again.", message, where)

    def accepted(self) -> None:
        """Tanium answered with anything but 401: the key is good."""
        if not self._rejected:
            return
        with self._lock:
            streak, self._rejected = self._rejected, 0
            self._m.unauthorized.labels(self._m.pipeline).set(0)
        if streak:
            log.info("Tanium accepts the API token again (after %d requests answered 401)", streak)

    def _read(self, path: str, stamp: tuple | None) -> None:
        """Under the lock. `stamp` was taken before the read, so a write in between shows as a new stamp
        on the next request and is read then; it is recorded after the read, so a request on another
        thread meanwhile waits for the lock rather than sending the old key."""
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read().strip()
            problem = "" if text else "is empty"
        except (OSError, UnicodeDecodeError) as e:
            text, problem = "", f"cannot be read ({getattr(e, 'strerror', None) or type(e).__name__})"
        if problem:
            self._stamp = stamp
            self._count("failed")
            if self._file_ok:
                log.warning(
                    "tanium.api_key_file %r %s; the connector keeps the key it read before (logged once until "
                    "the file holds a key again)",
                    path,
                    problem,
                )
            self._file_ok = False
            return
        self._file_ok = True
        if text != self._value:
            for callback in _new_key_callbacks:
                callback(text)
            if text not in self._known:
                self._known.append(text)
            self._value = text
            self._count("changed")
            log.info("tanium.api_key_file %r holds a new key; the next requests use it", path)
        self._stamp = stamp  # last: a request that sees the new stamp without the lock finds the new key

    def _count(self, result: str) -> None:
        self._m.api_key_reloads.labels(self._m.pipeline, result).inc()


def _stamp(path: str) -> tuple | None:
    """(device, inode, mtime, size) of the file the path resolves to (symlinks followed); None if it is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
