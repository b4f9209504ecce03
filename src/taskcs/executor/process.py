"""An executor process: connects a DEALER to the server and runs the execution loop.

Started by the server either by ``fork`` (fast: the interpreter and imports are inherited,
ready in milliseconds) or as ``python -m taskcs.executor.process ENDPOINT NAME``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

log = logging.getLogger(__name__)


def executor_main(endpoint: str, name: str, parent_pid: int) -> int:
    """Run an executor process until the server says BYE or goes away; return exit status."""
    import zmq

    from ..runtime.zmq_transport import ZmqConnection
    from .loop import ExecutorLoop

    # A Ctrl-C at the terminal reaches the whole process group: the server decides
    # when its executors stop, so they ignore SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    context = zmq.Context()
    # Executors never spin before blocking: their next task comes only after a whole
    # client -> server hop, and on a small machine a spinning executor takes the core the
    # server and client need for that (round trip p50 ~400 -> ~330 µs, p99 ~900 -> ~600 µs
    # without it, 2 cores, 3 runs each way).
    conn = ZmqConnection(endpoint, context, spin=0.0)
    try:
        loop = ExecutorLoop(conn, name, capture_output=True, alive=lambda: os.getppid() == parent_pid)
        reason = loop.run()
        log.info("executor %s leaving: %s", name, reason)
        return 0
    finally:
        conn.close()
        context.term()


def fork_executor(endpoint: str, name: str, close_fds: tuple[int, ...] = ()) -> int:
    """Fork an executor process from the calling (server) process; return the child's pid.

    Call it before the parent creates any ZeroMQ context; ``close_fds`` (e.g. the server's
    readiness pipe) are closed in the child so it holds nothing of the parent's.
    """
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # child: never return into the server's code
        code = 1
        try:
            for fd in close_fds:
                os.close(fd)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            # The parent's ZeroMQ context and sockets must not be touched after fork;
            # executor_main builds its own.
            code = executor_main(endpoint, name, parent)
        except BaseException:
            log.exception("executor %s crashed", name)
        finally:
            sys.stdout.flush()
            os._exit(code)
    return pid


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s executor %(levelname)s %(message)s")
    sys.exit(executor_main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else os.getppid()))
