"""examples/dlrm fails loud: a frozen peer, a non-finite loss or gradient, non-finite input."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.examples.test_dlrm_main import ROOT, TINY, _env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_frozen_peer_ends_the_job_after_pg_timeout(tmp_path: Path) -> None:
    """SIGSTOP on one of 2 gloo processes once training starts: the other one blocked for
    torch's 30-minute default; with ``--pg-timeout 10`` it fails with a timeout error."""
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = _env() | dict(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE="2",
            LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
        )  # fmt: skip
        args = [sys.executable, "-m", "examples.dlrm.main", *TINY, "--epochs", "3"]
        args += ["--pg-timeout", "10", "--out", str(tmp_path / "run")]
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True))
    lines: list[str] = []
    planned = threading.Event()

    def read() -> None:
        assert procs[0].stderr is not None
        for line in procs[0].stderr:
            lines.append(line)
            if "plan:" in line:
                planned.set()
        planned.set()  # the process ended before training

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        planned.wait(180)
        assert procs[0].poll() is None, "".join(lines)[-3000:]
        os.kill(procs[1].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        code = procs[0].wait(timeout=150)
        elapsed = time.monotonic() - stopped
    finally:
        for p in procs:
            p.kill()
            p.wait()
    reader.join(timeout=10)
    text = "".join(lines)
    assert code != 0, text[-3000:]
    assert "Timed out" in text or "timed out" in text, text[-3000:]
    assert elapsed < 120
