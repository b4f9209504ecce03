"""An executor process: connects a DEALER to the server and runs the execution loop.

Started by the server either by ``fork`` (fast: the interpreter and imports are inherited,
ready in milliseconds) or as ``python -m taskcs.executor.process ENDPOINT NAME``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

log = logging.getLogger(__name__)

#: prctl(2) option: the signal this process gets when its parent dies (Linux).
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> bool:
    """Have the kernel SIGKILL this process the moment ``parent_pid`` (its parent) exits.

    An executor whose server died must not run on: its task's result has nowhere to go, and
    its socket would reconnect to the next server at the same ipc path. A heartbeat check
    notices only between tasks, after a 30 s task is done; the parent-death signal acts at
    once, even mid-task. Returns False if the parent is already gone (or not ``parent_pid``).
    ``ctypes`` is imported with this module, so a forked executor inherits it loaded.

    Linux sends the signal when the parent *thread* that forked us exits: the server starts
    executors from its serving thread, which lives as long as the server.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the heartbeat check still applies
            log.debug("cannot set the parent-death signal")
    # The parent may have died before prctl took effect: then we were reparented already.
    return os.getppid() == parent_pid


def executor_main(endpoint: str, name: str, parent_pid: int) -> int:
    """Run an executor process until the server says BYE or goes away; return exit status."""
    import zmq

    from ..runtime.zmq_transport import ZmqConnection
    from .loop import ExecutorLoop

    # A Ctrl-C at the terminal reaches the whole process group: the server decides
    # when its executors stop, so they ignore SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not die_with_parent(parent_pid):
        return 0
    context = zmq.Context()
    # Executors never spin before blocking: their next task comes only after a whole
    # client -> server hop, and on a small machine a spinning executor takes the core the
    # server and client need for that (round trip p50 ~400 -> ~330 µs, p99 ~900 -> ~600 µs
    # without it, 2 cores, 3 runs each way).
    conn = ZmqConnection(endpoint, context, spin=0.0)
    try:
        loop = ExecutorLoop(conn, name, capture_output=True, alive=lambda: os.getppid() == parent_pid)
        from .nesting import enter_executor  # issue 13: a Client() in a task finds this server

        enter_executor(loop, endpoint)
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
