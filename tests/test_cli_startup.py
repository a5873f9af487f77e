"""Startup: the command line answers --help, --version and bad options without importing torch."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _imports_torch(code: str) -> bool:
    probe = f"{code}\nimport sys\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1] == "True"


def test_importing_the_command_line_does_not_import_torch():
    assert not _imports_torch("import flatcli.cli")


def test_importing_the_package_does_not_import_torch_until_a_name_is_used():
    assert not _imports_torch("import flatcli; flatcli.__version__; flatcli.FlatcliError")
    assert _imports_torch("import flatcli; flatcli.sharpness")


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["--version"],
        ["sharpness", "--help"],
        ["train", "-h"],
        ["sharpness", "run", "--curvature", "x"],
        ["train", "--epochs", "x"],
        ["sharpness", "run", "--bogus"],
        ["no-such-command"],
    ],
)
def test_help_version_and_option_errors_never_import_torch(args):
    code = (
        f"import sys\nfrom flatcli.cli import main\nsys.argv = ['flatcli', *{args!r}]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass"
    )
    assert not _imports_torch(code)


def test_the_public_function_sharpness_is_not_shadowed_by_its_module():
    import importlib

    import flatcli

    importlib.import_module("flatcli.workflows.sharpness")
    assert (
        callable(flatcli.sharpness)
        and flatcli.sharpness.__module__ == "flatcli.workflows.sharpness"
    )


#: Each public name of ``flatcli`` and the module that defines it.
CANONICAL = {
    "load_dataset": "flatcli.workflows.data",
    "DATASETS": "flatcli.workflows.data",
    "build_model": "flatcli.models.registry",
    "MODELS": "flatcli.models.registry",
    "train": "flatcli.workflows.training",
    "TrainResult": "flatcli.workflows.training",
    "evaluate": "flatcli.workflows.training",
    "TrainConfig": "flatcli.config",
    "make_train_config": "flatcli.config",
    "load_checkpoint": "flatcli.workflows.checkpoint",
    "save_checkpoint": "flatcli.workflows.checkpoint",
    "CheckpointInfo": "flatcli.workflows.checkpoint",
    "sharpness": "flatcli.workflows.sharpness",
    "measure": "flatcli.analysis.measures",
    "SharpnessConfig": "flatcli.config",
    "SharpnessReport": "flatcli.analysis.sharpness_report",
    "MEASURES": "flatcli.analysis.measures",
    "rank_bound": "flatcli.analysis.rank",
    "rank_report": "flatcli.analysis.rank",
    "FlatcliError": "flatcli.errors",
}


def test_every_public_name_is_the_object_of_its_canonical_module():
    import importlib

    import flatcli

    assert sorted(flatcli.__all__) == sorted(CANONICAL)
    for name, module_name in CANONICAL.items():
        module = importlib.import_module(module_name)
        value = getattr(flatcli, name)
        assert value is getattr(module, name), name
        if isinstance(value, type) or callable(value):  # defined there, not re-exported
            assert value.__module__ == module_name, (name, value.__module__)
    assert set(CANONICAL) <= set(dir(flatcli))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        flatcli.nope  # noqa: B018


def test_torch_free_name_lists_match_the_registries():
    from flatcli.analysis.measures import DTYPES, MEASURES
    from flatcli.config import BN_BATCH, BN_MODES, CURVATURE_NAMES, DTYPE_NAMES, MEASURE_NAMES
    from flatcli.curvature.operator import DEFAULT_BATCH, BatchNormMode, Curvature

    assert MEASURE_NAMES == tuple(MEASURES)
    assert DTYPE_NAMES == tuple(DTYPES)
    assert BN_MODES == tuple(m.value for m in BatchNormMode)
    assert CURVATURE_NAMES == tuple(c.value for c in Curvature)
    assert BN_BATCH == DEFAULT_BATCH


def _flatcli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flatcli", *args], capture_output=True, text=True)


def test_bare_flatcli_prints_its_help_and_no_empty_error():
    result = _flatcli()
    assert result.returncode == 2 and "Usage" in result.stdout
    assert "error" not in result.stderr


def test_an_absurd_thread_count_is_one_line_not_a_crash():
    result = _flatcli("--threads", "100000", "train", "--help")
    assert (
        result.returncode == 2
        and result.stderr.count("\n") == 1
        and "--threads 100000" in result.stderr
    )
