"""Fault scenarios, end to end through the command line (not part of the test suite).

Each scenario runs ``python -m flatcli`` in subprocesses on the embedded digits data,
in a temporary folder, and prints one line: PASS or FAIL, its name and what was seen.

    python bench/faults.py                 # all scenarios, about 2-4 minutes on 2 cores
    python bench/faults.py --only kill     # scenarios whose name contains "kill"

Scenarios that need root for a read-only or full file system (a read-only bind mount,
a tiny tmpfs) fall back to ``chmod`` or are skipped, and say so.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

FLATCLI = [sys.executable, "-m", "flatcli", "--threads", "1"]
#: a run long enough to be killed in the middle (about 0.1-0.2 s per epoch)
TRAIN = ["train", "--model", "mlp", "--width", "64", "--epochs", "40", "--seed", "3"]
QUICK = ["train", "--model", "logreg", "--epochs", "2"]
MEASURE = ["sharpness", "--measures", "lambda_max,trace", "--probes", "30"]


def run(*args: str, check: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [*FLATCLI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "FLATCLI_THREADS": "1"},
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"flatcli {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()[-300:]}"
        )
    return proc


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*FLATCLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def one_line_error(proc: subprocess.CompletedProcess) -> bool:
    return "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") <= 2


def wait_for(condition: Callable[[], bool], timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting for the process to get there")
        time.sleep(0.02)


def epochs_done(run_dir: Path) -> int:
    try:
        return len((run_dir / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


def orphans(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.tmp"))


@contextmanager
def read_only(folder: Path):
    """``folder`` read-only: a read-only bind mount as root (root ignores chmod), else chmod."""
    if os.geteuid() == 0:
        mounted = (
            subprocess.run(
                ["mount", "--bind", str(folder), str(folder)], capture_output=True
            ).returncode
            == 0
        )
        if (
            mounted
            and subprocess.run(
                ["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True
            ).returncode
            == 0
        ):
            try:
                yield "read-only bind mount"
            finally:
                subprocess.run(["umount", str(folder)], check=True)
            return
        if mounted:
            subprocess.run(["umount", str(folder)])
        raise SkipScenario("root, and no read-only bind mount possible here")
    mode = folder.stat().st_mode
    folder.chmod(0o555)
    try:
        yield "chmod 555"
    finally:
        folder.chmod(mode)


class SkipScenario(Exception):
    pass


# --- scenarios ---------------------------------------------------------------------


def kill_train_then_resume(tmp: Path) -> str:
    full, part = tmp / "full", tmp / "part"
    run(*TRAIN, "--out", str(full), check=True)
    proc = start(*TRAIN, "--out", str(part))
    wait_for(lambda: epochs_done(part) >= random.randint(3, 30) or proc.poll() is not None)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = epochs_done(part)
    resumed = run("train", "--out", str(part), "--resume", check=True)
    same = sha(full / "model.safetensors") == sha(part / "model.safetensors")
    left = orphans(part)
    assert same, (
        f"resumed model differs ({sha(part / 'model.safetensors')} vs {sha(full / 'model.safetensors')})"
    )
    assert not left, f"orphaned temporary files {left}"
    assert resumed.returncode == 0
    return f"killed after {killed_at} epochs; resumed with --resume alone; sha256 {sha(full / 'model.safetensors')} equal"


def kill_overwrite_keeps_old_run(tmp: Path) -> str:
    target = tmp / "run"
    run(*QUICK, "--out", str(target), check=True)
    before = sha(target / "model.safetensors")
    proc = start(*TRAIN, "--out", str(target), "--overwrite")
    staged = lambda: [p for p in target.rglob("metrics.jsonl") if p.parent != target]  # noqa: E731
    wait_for(lambda: proc.poll() is not None or len(staged()) > 0)  # the new run is under way
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert sha(target / "model.safetensors") == before, "the old run changed"
    measured = run(*MEASURE, str(target), "--json")
    assert measured.returncode == 0, measured.stderr
    return "SIGKILL during train --overwrite: the old run is intact and measurable"


def typo_overwrite_keeps_old_run(tmp: Path) -> str:
    target = tmp / "run"
    run(*QUICK, "--out", str(target), check=True)
    before = sha(target / "model.safetensors")
    seen = []
    for bad in (
        ["--optimizer", "sgdd"],
        ["--schedule", "cosin"],
        ["--model", "mlp", "--width", "0"],
    ):
        proc = run(*QUICK, "--out", str(target), "--overwrite", *bad)
        assert proc.returncode != 0 and one_line_error(proc), proc.stderr
        seen.append(f"{' '.join(bad)} -> exit {proc.returncode}")
    assert sha(target / "model.safetensors") == before
    return "; ".join(seen) + "; old run intact"


def overwrite_refuses_foreign_files(tmp: Path) -> str:
    folder = tmp / "thesis"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("years of work")
    proc = run(*QUICK, "--out", str(folder), "--overwrite")
    assert proc.returncode != 0 and one_line_error(proc), proc.stderr
    assert (folder / "chapter1.tex").read_text() == "years of work"
    cwd = subprocess.run(
        [*FLATCLI, *QUICK, "--out", ".", "--overwrite"], cwd=folder, capture_output=True, text=True
    )
    assert cwd.returncode != 0 and (folder / "chapter1.tex").exists()
    return f"refused (exit {proc.returncode}, and exit {cwd.returncode} for --out .): {proc.stderr.strip()[:90]}"


def concurrent_train_same_out(tmp: Path) -> str:
    target = tmp / "run"
    procs = [start(*TRAIN, "--epochs", "15", "--out", str(target)) for _ in range(2)]
    codes = sorted(p.wait() for p in procs)
    errors = [p.stderr.read() for p in procs]
    assert codes[0] == 0 and codes[1] != 0, f"exit codes {codes}"
    assert all("Traceback" not in e for e in errors)
    assert (target / "model.safetensors").exists()
    line = next(e for e in errors if e.strip()).strip().splitlines()[-1]
    return f"exit codes {codes}; the second said: {line[:90]}"


def kill_sharpness_leaves_valid_cache(tmp: Path) -> str:
    target = tmp / "run"
    run(*QUICK, "--model", "mlp", "--out", str(target), check=True)
    run(*MEASURE, str(target), check=True)
    kills = 0
    for seed in range(1, 7):
        proc = start(
            *MEASURE, str(target), "--seed", str(seed), "--max-iter", "200", "--probes", "300"
        )
        time.sleep(random.uniform(2.0, 4.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    json.loads((target / "sharpness.json").read_text())  # still valid JSON
    again = run(*MEASURE, str(target), "--json", check=True)
    assert json.loads(again.stdout).get("cached") is True, "the first result is no longer cached"
    left = orphans(target)
    return f"{kills} processes killed mid-measurement; cache valid, first result still served" + (
        f"; temporary files left: {left}" if left else ""
    )


def concurrent_sharpness_keep_every_result(tmp: Path, n: int = 4) -> str:
    target = tmp / "run"
    run(*QUICK, "--out", str(target), check=True)
    procs = [start(*MEASURE, str(target), "--seed", str(s), "--json") for s in range(n)]
    codes = [p.wait() for p in procs]
    assert codes == [0] * n, codes
    cached = [
        json.loads(run(*MEASURE, str(target), "--seed", str(s), "--json", check=True).stdout).get(
            "cached"
        )
        for s in range(n)
    ]
    assert cached == [True] * n, f"cached afterwards: {cached}"
    return f"{n} concurrent processes, all {n} results cached"


def read_only_run_folder_prints_result(tmp: Path) -> str:
    target = tmp / "run"
    run(*QUICK, "--out", str(target), check=True)
    with read_only(target) as how:
        proc = run(*MEASURE, str(target), "--json")
    assert proc.returncode == 0, proc.stderr
    value = json.loads(proc.stdout)["lambda_max"]["value"]
    warning = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "(no warning)"
    return f"{how}: lambda_max {value:.4g} printed; stderr: {warning[:80]}"


def out_under_read_only_folder(tmp: Path) -> str:
    parent = tmp / "locked"
    parent.mkdir()
    with read_only(parent) as how:
        proc = run(*QUICK, "--out", str(parent / "run"))
    assert proc.returncode == 1 and one_line_error(proc), (proc.returncode, proc.stderr)
    return f"{how}: exit 1, {proc.stderr.strip()[:90]}"


def full_disk_during_train(tmp: Path) -> str:
    if os.geteuid() != 0:
        raise SkipScenario("needs root to mount a small tmpfs")
    disk = tmp / "tiny"
    disk.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True
    ).returncode:
        raise SkipScenario("cannot mount a tmpfs here")
    try:
        proc = run(
            "train", "--model", "mlp", "--width", "256", "--epochs", "2", "--out", str(disk / "run")
        )
        left = sorted(p.name for p in disk.rglob("*"))
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    assert proc.returncode == 1 and one_line_error(proc), (proc.returncode, proc.stderr)
    return f"64 KiB disk: exit 1, {proc.stderr.strip()[:80]}; left on the disk: {left or 'nothing'}"


SCENARIOS: dict[str, Callable[[Path], str]] = {
    "kill-train-then-resume": kill_train_then_resume,
    "kill-overwrite-keeps-old-run": kill_overwrite_keeps_old_run,
    "typo-overwrite-keeps-old-run": typo_overwrite_keeps_old_run,
    "overwrite-refuses-foreign-files": overwrite_refuses_foreign_files,
    "concurrent-train-same-out": concurrent_train_same_out,
    "kill-sharpness-leaves-valid-cache": kill_sharpness_leaves_valid_cache,
    "concurrent-sharpness-keep-every-result": concurrent_sharpness_keep_every_result,
    "read-only-run-folder-prints-result": read_only_run_folder_prints_result,
    "out-under-read-only-folder": out_under_read_only_folder,
    "full-disk-during-train": full_disk_during_train,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the scenarios whose name contains this")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill times")
    args = parser.parse_args()
    random.seed(args.seed)
    failed = 0
    for name, scenario in SCENARIOS.items():
        if args.only not in name:
            continue
        tmp = Path(tempfile.mkdtemp(prefix=f"flatcli-{name}-"))
        t0 = time.perf_counter()
        try:
            outcome, text = "PASS", scenario(tmp)
        except SkipScenario as exc:
            outcome, text = "SKIP", str(exc)
        except Exception as exc:  # a failed scenario is reported, the others still run
            outcome, text = "FAIL", f"{type(exc).__name__}: {str(exc).strip()[:300]}"
            failed += 1
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"{outcome}  {name:<40} {time.perf_counter() - t0:5.1f} s  {text}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
