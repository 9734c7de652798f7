"""A torchrun worker ends when its launcher dies.

torchrun starts each worker in its own session (``start_new_session``), so killing torchrun alone
(SIGKILL, an OOM kill, a lost node agent) leaves the workers running: they finish by themselves
and write ``result.json`` while the user re-runs the command with ``--resume``, or, killed during
start-up, wait for their peers until the process-group timeout.  :func:`end_with_launcher`,
called first thing in a worker, asks the kernel to SIGKILL the worker when its parent (torchrun's
agent, which starts the workers from its main thread) exits.  Standard library only: it runs
before torch is imported, so that a launcher killed during the workers' start-up takes them too.
"""

import ctypes
import os
import signal
import sys
import threading
import time

# <linux/prctl.h>
PR_SET_PDEATHSIG = 1
# how often a worker without prctl looks for its launcher
POLL_S = 0.5


def _launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_S)
    os.kill(os.getpid(), signal.SIGKILL)


def end_with_launcher() -> None:
    """Under torchrun, SIGKILL this process as soon as its launcher exits (no-op otherwise).

    On Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)``; elsewhere a daemon thread that polls the parent
    pid.  A launcher that died before this call (the worker was re-parented, to init or a
    subreaper) ends the worker at once; one that dies during the interpreter's start-up, before
    this call, is only caught if the worker went to init (parent pid 1).

    Example::

        >>> end_with_launcher()  # not under torchrun: nothing happens
    """
    if not _launched_by_torchrun():
        return
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    else:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if parent == 1 or os.getppid() != parent:  # already gone: no signal will come
        os.kill(os.getpid(), signal.SIGKILL)
