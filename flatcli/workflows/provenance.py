"""Provenance: what a result was computed with, recorded in every checkpoint and JSON document.

A number is reproducible only with the conditions it came from: the device it was
computed on (resolved, never ``auto``), the Python, torch and CUDA versions, the command
line as run, the time, and the git commit of the working directory when there is one.
:func:`provenance` builds this record; checkpoints keep it in their metadata under
``provenance`` (:mod:`flatcli.workflows.training`), and the JSON documents of
``sharpness``, ``compare``, ``rank-bound`` and ``demo`` end with it. It never decides a
number, so it never enters the ``sharpness.json`` cache key
(:func:`flatcli.workflows.cache.cache_key`); a report served from the cache carries the
provenance of the call that asked for it.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TypedDict

import torch

from flatcli.distributed import device_for, resolve_device

__all__ = ["GIT_TIMEOUT_S", "Provenance", "git_commit", "provenance", "resolved_device"]

#: Seconds ``git rev-parse HEAD`` may take before the commit is recorded as unknown.
GIT_TIMEOUT_S = 2.0


class Provenance(TypedDict):
    """The provenance record, as JSON: one object under the key ``provenance``."""

    device: str
    python: str
    torch: str
    cuda: str | None
    command: list[str]
    time: str
    git_commit: str | None


def resolved_device(device: str | torch.device) -> str:
    """The device ``device`` names here: ``auto`` resolved, CUDA with its index (``cuda:0``)."""
    dev = device if isinstance(device, torch.device) else resolve_device(device_for(device))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return str(dev)


def git_commit(cwd: str | os.PathLike[str] | None = None) -> str | None:
    """The commit checked out in the git repository holding ``cwd`` (default: the working directory).

    ``git rev-parse HEAD`` with a short timeout; None outside a repository, when git is
    missing, or when it does not answer in :data:`GIT_TIMEOUT_S` seconds.
    """
    where = Path.cwd() if cwd is None else Path(cwd)
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--verify", "--quiet", "HEAD"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None


def provenance(device: str | torch.device = "auto") -> Provenance:
    """The provenance record of this process computing on ``device`` (see the module docstring)."""
    return {
        "device": resolved_device(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "command": list(sys.argv),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
    }
