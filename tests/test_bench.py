"""The oracle and the patching of bench/sharpness_vs_peers.py, without the peers installed."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "sharpness_vs_peers.py"


def _load_bench() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("sharpness_vs_peers", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def power_iteration_quotients(h: torch.Tensor, steps: int, seed: int) -> list[float]:
    """v^T H v of each step of PyHessian's loop (v normalised, then v <- Hv / ||Hv||)."""
    v = torch.randn(h.shape[0], generator=torch.Generator().manual_seed(seed), dtype=h.dtype)
    v = v / v.norm()
    out = []
    for _ in range(steps):
        hv = h @ v
        out.append(float(hv @ v))
        v = hv / hv.norm()
    return out


def pyhessian_value(traj: list[float], tol: float) -> tuple[float, int]:
    """What PyHessian's eigenvalues() returns for these quotients and tol, and its products
    (the loop of pyhessian/hessian.py, written out).
    """
    eigenvalue = None
    for i, q in enumerate(traj):
        if eigenvalue is not None and abs(eigenvalue - q) / (abs(eigenvalue) + 1e-6) < tol:
            return eigenvalue, i + 1
        eigenvalue = q
    assert eigenvalue is not None
    return eigenvalue, len(traj)


@pytest.fixture
def spectrum() -> tuple[torch.Tensor, float]:
    lam = torch.tensor([10.0, 9.0, 8.5, 5.0, 3.0, 1.0, -2.0], dtype=torch.float64)
    q, _ = torch.linalg.qr(
        torch.randn(7, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    )
    return q @ torch.diag(lam) @ q.T, 10.0


def test_ph_stop_reproduces_pyhessian_stopping_rule(spectrum: tuple[torch.Tensor, float]) -> None:
    h, _ = spectrum
    traj = power_iteration_quotients(h, 200, seed=1)
    for tol in (1e-1, 1e-2, 1e-3, 1e-4, 1e-6):
        stop = bench.ph_stop(traj, tol)
        value, products = pyhessian_value(traj, tol)
        assert stop is not None
        assert (traj[stop - 1], stop + 1) == (value, products)


def test_loosest_tol_is_the_loosest_that_reaches_the_target(
    spectrum: tuple[torch.Tensor, float],
) -> None:
    h, ref = spectrum
    for seed in range(4):
        traj = power_iteration_quotients(h, 400, seed)
        oracle = bench.loosest_tol(traj, ref)
        assert oracle is not None
        assert oracle.lower < oracle.run <= oracle.upper
        # every tol in the interval stops at the same step, within the target
        for tol in (oracle.run, oracle.upper, oracle.lower * (1 + 1e-9)):
            value, products = pyhessian_value(traj, tol)
            assert products == oracle.stop + 1
            assert abs(value - ref) / ref < bench.TARGET_EIG
        # any looser tol stops earlier, outside the target
        value, products = pyhessian_value(traj, oracle.upper * (1 + 1e-9))
        assert products < oracle.stop + 1
        assert abs(value - ref) / ref >= bench.TARGET_EIG


def test_loosest_tol_none_when_never_within_target() -> None:
    traj = [1.0, 1.5, 1.75, 1.875]  # heading for 2, never within 1e-3 of it
    assert bench.loosest_tol(traj, 2.0) is None


def test_fewest_iterations_needs_every_later_quotient_within_target() -> None:
    errs = [0.5, 1e-4, 2e-3, 5e-4, 1e-4]  # within at step 2, out again at step 3
    assert bench.fewest_iterations(errs) == 4
    assert bench.fewest_iterations([0.5, 0.1]) is None


def test_recording_pyhessian_counts_records_and_restores() -> None:
    h = torch.diag(torch.tensor([3.0, 1.0]))

    def hessian_vector_product(
        grads_h: object, params: object, v: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        return [h @ v[0]]

    fake = types.ModuleType("pyhessian_hessian")
    fake.hessian_vector_product = hessian_vector_product
    with bench.recording_pyhessian(fake) as recorder:
        assert fake.hessian_vector_product is not hessian_vector_product
        recorder.trajectory = []
        fake.hessian_vector_product(None, None, [torch.tensor([1.0, 0.0])])
        fake.hessian_vector_product(None, None, [torch.tensor([0.0, 1.0])])
    assert fake.hessian_vector_product is hessian_vector_product
    assert recorder.calls == 2
    assert recorder.trajectory == [3.0, 1.0]

    with pytest.raises(RuntimeError), bench.recording_pyhessian(fake):
        raise RuntimeError("a failed run")
    assert fake.hessian_vector_product is hessian_vector_product


def test_print_table_aligns_columns(capsys: pytest.CaptureFixture[str]) -> None:
    bench.print_table(
        "t", ["name", "setting", "seconds"], [["a", "b", 0.123456], ["long", "x", 12]]
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "",
        "  t",
        "  ----  -------  -------",
        "  name  setting  seconds",
        "  ----  -------  -------",
        "  a     b          0.123",
        "  long  x             12",
        "  ----  -------  -------",
    ]


# --- bench/paper_scale.py ------------------------------------------------------------------


def _load_paper_scale() -> types.ModuleType:
    path = BENCH.with_name("paper_scale.py")
    spec = importlib.util.spec_from_file_location("paper_scale", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_paper_scale_prints_every_figure_for_a_tiny_model(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    paper_scale = _load_paper_scale()
    monkeypatch.setitem(paper_scale.MODELS, "vgg16", ("vgg16", {"width_factor": 0.0625}))
    paper_scale.main(
        ["--models", "vgg16", "--n", "8", "--batch", "4", "--hvp-batch", "4", "--steps", "2"]
        + ["--device", "cpu"]
    )
    out = capsys.readouterr().out.splitlines()
    lines = out[next(i for i, line in enumerate(out) if "paper scale on cpu" in line) :]
    assert "n = 8 inputs 3x32x32, 100 classes" in lines[0]
    header, row = lines[1].split(), lines[2].split()
    assert header[:2] == ["model", "params"] and row[0] == "vgg16"
    epoch_s, hvp_batch_s, hvp_eval_s, lambda_max_s, hvps = row[2:7]
    assert min(float(epoch_s), float(hvp_batch_s), float(hvp_eval_s), float(lambda_max_s)) > 0
    assert int(hvps) == 3  # the fixed Lanczos steps, and the float64 re-check of the bound
    with_pyhessian = importlib.util.find_spec("pyhessian") is not None
    assert (row[-2] != "—") == with_pyhessian  # lambda_max seconds, flatcli / PyHessian
    assert row[-1] == "—"  # no CUDA: no peak memory
