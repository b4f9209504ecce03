"""Who may connect over TCP: a ZAP handler that admits only trusted CURVE keys.

pyzmq's :class:`~zmq.auth.thread.ThreadAuthenticator` answers ZeroMQ's ZAP requests on a
thread of its own; we give it a callback that reads the trusted keys afresh (so `cs-server
keys trust` takes effect without a restart) and logs each refused key once a minute at most,
so a stranger knocking in a loop cannot fill the log. A refused connection never completes
its handshake: it can send nothing that reaches the dispatcher and receives nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from ..runtime import keys

log = logging.getLogger(__name__)

#: Seconds between two log lines about the same refused key.
REFUSAL_LOG_INTERVAL = 60.0
#: Refused keys remembered for rate limiting; bounded so a flood of fresh keys cannot grow it.
REFUSALS_TRACKED = 1024


class TrustedKeys:
    """The ZAP callback: allow a CURVE client key only if it is in the trusted directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.refused = 0
        self._last_logged: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def callback(self, domain: str, key: bytes) -> bool:
        """pyzmq's credentials-provider hook: True admits the connection."""
        if key in keys.trusted(self.directory):
            return True
        with self._lock:
            self.refused += 1
            now = time.monotonic()
            last = self._last_logged.get(key)
            if last is None or now - last >= REFUSAL_LOG_INTERVAL:
                self._last_logged[key] = now
                self._last_logged.move_to_end(key)
                while len(self._last_logged) > REFUSALS_TRACKED:
                    self._last_logged.popitem(last=False)
                log.warning("refused a connection from untrusted key %s (%d refused so far); to allow it: "
                            "cs-server keys trust %s", key.decode(), self.refused, key.decode())
        return False


def start_authenticator(context: Any, directory: Path) -> tuple[Any, TrustedKeys]:
    """Start the ZAP handler for ``context``; returns (authenticator, its key check)."""
    from zmq.auth.thread import ThreadAuthenticator

    trusted = TrustedKeys(directory)
    auth = ThreadAuthenticator(context, log=logging.getLogger("taskcs.server.zap"))
    auth.start()
    auth.configure_curve_callback("*", credentials_provider=trusted)
    return auth, trusted
