"""Launching ``python -m flatcli`` under torchrun from a test (CPU processes, gloo)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

TIMEOUT_S = 180  # a hang fails the test instead of the suite


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    """One thread per process and a short collective timeout (a dead peer fails fast)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "FLATCLI_DIST_TIMEOUT": "60", **extra}


def torchrun(
    *args, nproc: int = 2, timeout: float = TIMEOUT_S, **extra_env
) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc-per-node N -m flatcli --threads 1 ARGS``."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "flatcli",
        "--threads",
        "1",
        *map(str, args),
    ]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=env(**extra_env)
    )
