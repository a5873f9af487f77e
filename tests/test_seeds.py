"""Verdicts that survive training noise: arms of several seeds, and accuracies with their noise.

Specification (flatcli.analysis.seeds, flatcli.analysis.verdicts):
- an arm's quantities are means over its runs, with the sample sd (ddof=1) and the
  standard error sd/sqrt(n); its sharpness uncertainty is sqrt(s^2/n + mean(u_i^2)/n);
- a run's judged test accuracy is the mean of its last K epochs with their sd as noise,
  the final accuracy with its binomial standard error for an averaged run or a run
  without history; an arm of n >= 2 seeds uses the standard error across seeds;
- accuracies tie within accuracy_sigmas * sqrt(noise_a^2 + noise_b^2), a noise never
  below the binomial standard error of the test set; each verdict says which noise.
"""

from __future__ import annotations

import io
import math
from dataclasses import replace

import pytest
from cli.fakes import run as fake_run  # tests/cli/fakes.py
from rich.console import Console

from flatcli.analysis.claims import CONTRAST_CLAIMS, pair_claim
from flatcli.analysis.seeds import (
    JudgedAccuracy,
    Spread,
    arm,
    arm_name,
    binomial_se,
    run_accuracy,
    spread,
)
from flatcli.analysis.verdicts import RunSummary, accuracy_tie, compare
from flatcli.config import ACCURACY_EPOCHS, DemoConfig
from flatcli.curvature.results import Estimate
from flatcli.errors import UsageError
from flatcli.report.tables import accuracy_noise_line, comparison_table
from flatcli.workflows import demo
from flatcli.workflows.compare import comparison_fields
from flatcli.workflows.demo import arm_runs, variant_config


def rendered(table: object) -> str:
    """What a 100-column console prints for ``table``."""
    console = Console(width=100, record=True, file=io.StringIO(), color_system=None)
    console.print(table)
    return console.export_text()


def run(name, test_accuracy, lambda_max=1.0, uncertainty=0.0, **changes) -> RunSummary:
    """A run (tests/cli/fakes.py) on 360 test images, its lambda_max with ``uncertainty``."""
    fields: dict = dict(
        train_loss=0.01,
        weight_norm=10.0,
        measures={"lambda_max": Estimate(lambda_max, uncertainty, "bound")},
        test_size=360,
    )
    return fake_run(name, test_accuracy, lambda_max, **{**fields, **changes})


def test_an_arm_is_the_mean_sd_and_standard_error_of_its_seeds():
    runs = [
        run("sgd-s0", 0.90, 1.0, 0.1, weight_norm=4.0),
        run("sgd-s1", 0.92, 2.0, 0.2, weight_norm=5.0),
        run("sgd-s2", 0.97, 3.0, 0.2, weight_norm=9.0),
    ]
    sgd = arm(runs)
    assert sgd.name == "sgd" and sgd.runs == ("sgd-s0", "sgd-s1", "sgd-s2") and sgd.seeds == 3
    # accuracies 0.90, 0.92, 0.97: mean 0.93, sd sqrt(0.0013 / 2 * 2 / 2) = 0.036056, se sd / sqrt(3)
    acc = sgd.spread["test_accuracy"]
    assert acc.mean == pytest.approx(0.93) and acc.n == 3
    assert acc.sd == pytest.approx(0.0360555, abs=1e-6)
    assert acc.se == pytest.approx(0.0208167, abs=1e-6)
    assert sgd.test_accuracy == pytest.approx(0.93)
    judged = sgd.accuracy
    assert judged is not None and (judged.source, judged.count) == ("seeds", 3)
    assert judged.value == pytest.approx(0.93) and judged.noise == pytest.approx(acc.se)
    # weight norms 4, 5, 9: mean 6, sd sqrt((4 + 1 + 9) / 2) = sqrt(7)
    assert sgd.weight_norm == pytest.approx(6.0)
    assert sgd.spread["weight_norm"].sd == pytest.approx(math.sqrt(7))
    # lambda_max 1, 2, 3 (s = 1) with bounds 0.1, 0.2, 0.2: sqrt(1/3 + 0.03/3) = 0.58595
    lam = sgd.measures["lambda_max"]
    assert lam.value == pytest.approx(2.0) and lam.kind == "stderr" and lam.converged
    assert lam.uncertainty == pytest.approx(math.sqrt(1 / 3 + 0.03 / 3))
    assert sgd.spread["lambda_max"].sd == pytest.approx(1.0)


def test_one_run_has_no_spread_and_an_arm_of_one_is_the_run():
    assert spread([0.9]) == Spread(mean=0.9, sd=None, se=None, n=1)
    single = run("a", 0.9)
    assert arm([single]) == single and arm([single], "b") == replace(single, name="b")
    with pytest.raises(UsageError):
        arm([])


def test_an_arm_with_an_unconverged_run_is_not_converged():
    unconverged = {"lambda_max": Estimate(1.2, math.inf, "bound", converged=False)}
    runs = [run("a-s0", 0.9, 1.0, 0.1), run("a-s1", 0.9, measures=unconverged)]
    lam = arm(runs).measures["lambda_max"]
    assert not lam.converged and lam.uncertainty == math.inf


@pytest.mark.parametrize(
    "names, expected",
    [
        (["mlp-sgd-s0", "mlp-sgd-s1", "mlp-sgd-s2"], "mlp-sgd"),
        (["mlp-sgd", "mlp-sgd-s1"], "mlp-sgd"),  # the demo's folders: the first seed unsuffixed
        (["a", "b", "c"], "a-x3"),
        (["only"], "only"),
    ],
)
def test_an_arm_is_named_after_its_runs(names, expected):
    assert arm_name(names) == expected


def test_a_runs_accuracy_is_the_mean_of_its_last_epochs_with_their_spread():
    history = [0.5, 0.6, 0.90, 0.92, 0.94, 0.96, 0.98]
    acc = run_accuracy(0.98, 360, history)
    assert acc is not None and (acc.source, acc.count) == ("epochs", ACCURACY_EPOCHS) == (
        "epochs",
        5,
    )
    assert acc.value == pytest.approx(0.94)
    assert acc.noise == pytest.approx(math.sqrt(0.004 / 4))  # sd of 0.90 .. 0.98 by 0.02
    assert run_accuracy(0.98, 360, history, last=2).value == pytest.approx(0.97)


def test_an_averaged_run_or_one_without_history_is_judged_by_its_final_accuracy():
    history = [0.90, 0.92, 0.94, 0.96, 0.98]
    averaged = run_accuracy(0.95, 400, history, averaged=True)
    assert averaged == JudgedAccuracy(0.95, binomial_se(0.95, 400), "binomial", 400)
    assert binomial_se(0.95, 400) == pytest.approx(math.sqrt(0.95 * 0.05 / 400))
    assert run_accuracy(0.95, 400) == averaged  # a checkpoint from elsewhere: no history
    assert run_accuracy(0.95, None) is None  # nothing to judge a tie by
    with pytest.raises(UsageError, match="last-epochs"):
        run_accuracy(0.95, 400, history, last=1)


# The demo's cnn run with L2: the last 8 epochs swung between 91% and 97% at a constant
# learning rate and ended at 91.9%; the run without L2 ended at 94%.
SWING = [0.80, 0.88, 0.91, 0.97, 0.92, 0.96, 0.91, 0.97, 0.93, 0.919]


def test_a_final_accuracy_that_swings_within_its_own_noise_is_a_tie_not_a_verdict():
    sgd = run("cnn-sgd", 0.94, lambda_max=1.0)
    l2 = run("cnn-sgd-l2", 0.919, lambda_max=5.0, l2=5e-3)
    # judged by one final number each (binomial, 360 samples): 2.1 points > 1.9, a verdict
    (old,) = compare([sgd, l2]).verdicts
    assert not old.accuracy_tie and old.agrees is True and old.accuracy_noise == "binomial"
    claim = CONTRAST_CLAIMS["L2 regularisation"]
    assert pair_claim("cnn", compare([sgd, l2]), claim).held is False
    # judged by the last 5 epochs: 93.78% +- 2.61, against 94% +- 1.25 (binomial): a tie
    swinging = replace(l2, accuracy=run_accuracy(0.919, 360, SWING))
    result = compare([replace(sgd, accuracy=run_accuracy(0.94, 360)), swinging])
    (v,) = result.verdicts
    assert v.accuracy_tie and v.agrees is None and not v.sharpness_tie
    assert v.accuracy_difference_points == pytest.approx(100 * (0.9378 - 0.94))
    sd = math.sqrt(sum((x - 0.9378) ** 2 for x in SWING[-5:]) / 4)
    assert v.accuracy_threshold_points == pytest.approx(
        100 * math.hypot(sd, binomial_se(0.94, 360))
    )
    assert (v.accuracy_noise, v.accuracy_noise_counts) == ("binomial+epochs", (360, 5))
    assert "sd of the last 5 epochs (cnn-sgd-l2)" in v.text
    outcome = pair_claim("cnn", result, claim)
    assert outcome.held is None and "test accuracy ties" in outcome.evidence


def test_seeds_set_the_noise_when_there_are_several():
    # 10,000 test samples: a binomial noise (0.2 points) below both spreads
    a = arm([run(f"sgd-s{i}", p, 1.0, test_size=10_000) for i, p in enumerate((0.90, 0.92, 0.97))])
    b = arm(
        [
            run(f"l2-s{i}", p, 3.0, l2=5e-3, test_size=10_000)
            for i, p in enumerate((0.95, 0.96, 0.97))
        ]
    )
    (v,) = compare([a, b]).verdicts
    assert (v.accuracy_noise, v.accuracy_noise_counts) == ("seeds", (3, 3))
    # se 2.08 and 0.577 points: |96 - 93| = 3 > sqrt(2.08^2 + 0.577^2) = 2.16
    assert v.accuracy_threshold_points == pytest.approx(
        100 * math.hypot(0.0208167, 0.01 / math.sqrt(3)), rel=1e-5
    )
    assert not v.accuracy_tie and v.agrees is False
    assert accuracy_noise_line(compare([a, b])) == (
        "accuracy ties: |Δ acc.| within the noise, s.e. over 3 seeds (sgd, l2)"
    )
    claim = pair_claim("mlp", compare([a, b]), CONTRAST_CLAIMS["L2 regularisation"])
    assert claim.held is True
    assert claim.evidence == (
        "held: l2 sharper, generalises better; lambda_max 1 -> 3 (3x), "
        "test acc 93.0% -> 96.0% (noise 2.2 pts, 3 seeds)"
    )
    assert len(claim.evidence.removeprefix("held: ")) <= 110  # one line of the claims table


def test_no_spread_is_taken_below_the_binomial_noise_of_the_test_set():
    # three seeds within 0.1 point of each other on 360 test samples: se 0.06 points, but
    # 360 samples cannot measure an accuracy better than +-1.3 points
    a = arm([run(f"a-s{i}", p) for i, p in enumerate((0.900, 0.901, 0.902))])
    b = arm([run(f"b-s{i}", p, 2.0) for i, p in enumerate((0.920, 0.921, 0.922))])
    tie = accuracy_tie(a, b)
    assert (tie.noise, tie.counts) == ("binomial", (360, 360))
    pooled = (0.901 + 0.921) / 2
    assert tie.points == pytest.approx(100 * math.sqrt(pooled * (1 - pooled) * 2 / 360))
    assert compare([a, b]).verdicts[0].accuracy_tie
    assert accuracy_noise_line(compare([a, b])) == (
        "accuracy ties: |Δ acc.| within the noise, binomial s.e. of 360 test samples (a, b); "
        "a spread below the binomial s.e. counts as that"
    )


def test_a_fixed_threshold_is_recorded_as_such():
    (v,) = compare([run("a", 0.9), run("b", 0.95, 2.0)], tie_accuracy=1.0).verdicts
    assert (v.accuracy_noise, v.accuracy_noise_counts, v.accuracy_threshold_points) == (
        "threshold",
        (),
        1.0,
    )


def test_the_runs_table_shows_an_arms_mean_and_sd_and_the_judged_accuracy():
    a = arm([run(f"sgd-s{i}", p, 1.0 + i) for i, p in enumerate((0.90, 0.92, 0.97))])
    b = run("gadam", 0.95, 2.0, averaging=3, accuracy=run_accuracy(0.95, 360))
    text = rendered(comparison_table(compare([a, b])))
    assert "(3 seeds: mean ± sd)" in text
    assert "93.00% ± 3.61" in text  # the final accuracies' mean and sd (points)
    assert "93.0% ± 2.1 (3 seeds)" in text  # judged: the standard error across seeds
    assert "95.0% ± 1.1 (binomial)" in text
    assert "2 ± 1 (1.00x)" in text  # lambda_max 1, 2, 3: mean 2, sd 1
    assert max(len(line) for line in text.splitlines()) <= 100


def test_the_comparison_document_has_each_arms_runs_and_spread():
    a = arm([run(f"sgd-s{i}", p) for i, p in enumerate((0.90, 0.92, 0.97))])
    doc = comparison_fields(compare([a, run("b", 0.95, 2.0)]))
    first, second = doc["runs"]
    assert (first["n"], first["runs"]) == (3, ["sgd-s0", "sgd-s1", "sgd-s2"])
    assert first["spread"]["test_accuracy"] == {  # flatcli's one uncertainty object, plus sd and n
        "value": pytest.approx(0.93),
        "uncertainty": pytest.approx(0.0208167, abs=1e-6),
        "kind": "stderr",
        "converged": True,
        "sd": pytest.approx(0.0360555, abs=1e-6),
        "n": 3,
    }
    judged = first["judged_accuracy"]
    assert (judged["source"], judged["kind"], judged["count"]) == ("seeds", "stderr", 3)
    assert judged["uncertainty"] == pytest.approx(0.0208167, abs=1e-6)
    assert (second["n"], second["runs"], second["spread"]) == (1, ["b"], {})
    (verdict,) = doc["verdicts"]
    assert verdict["accuracy_noise"] == "seeds+binomial"


def test_the_demo_trains_each_variant_with_each_seed_the_first_in_the_old_folder(tmp_path):
    config = DemoConfig.reduced(out=tmp_path, seed=3, seeds=3)
    assert arm_runs(config, "mlp", "sgd-l2") == ["mlp-sgd-l2", "mlp-sgd-l2-s4", "mlp-sgd-l2-s5"]
    configs = [variant_config(config, "mlp", "sgd-l2", seed) for seed in (3, 4, 5)]
    assert [c.seed for c in configs] == [3, 4, 5]
    assert [c.out for c in configs] == [tmp_path / n for n in arm_runs(config, "mlp", "sgd-l2")]
    assert all(
        replace(c, seed=0, out=None) == replace(configs[0], seed=0, out=None) for c in configs
    )
    assert arm_runs(DemoConfig.reduced(out=tmp_path), "mlp", "sgd") == ["mlp-sgd"]
    with pytest.raises(UsageError, match="--seeds"):
        DemoConfig(seeds=0)


class _Stop(Exception):
    """Ends a demo once its comparisons are made."""


def test_the_demo_trains_every_seed_and_compares_arm_against_arm(monkeypatch, tmp_path):
    trained, compared = [], []

    def ensure_run(tc, overwrite, **kwargs):
        trained.append((tc.out.name, tc.seed))
        return tc.out

    def compare_checkpoints(arms, *args, **kwargs):
        compared.append(arms)
        return compare([run("a", 0.9), run("b", 0.95, 2.0)])

    def rank_checkpoint(*args, **kwargs):
        raise _Stop

    monkeypatch.setattr(demo, "existing_run", lambda tc, overwrite: False)
    monkeypatch.setattr(demo, "ensure_run", ensure_run)
    monkeypatch.setattr(demo, "compare_checkpoints", compare_checkpoints)
    monkeypatch.setattr(demo, "rank_checkpoint", rank_checkpoint)
    with pytest.raises(_Stop):
        demo.run_demo(DemoConfig.reduced(out=tmp_path, models=("mlp",), seeds=2))
    assert sorted(trained) == [
        ("mlp-gadam", 0),
        ("mlp-gadam-s1", 1),
        ("mlp-sgd", 0),
        ("mlp-sgd-l2", 0),
        ("mlp-sgd-l2-s1", 1),
        ("mlp-sgd-s1", 1),
    ]
    sgd = [tmp_path / "mlp-sgd", tmp_path / "mlp-sgd-s1"]
    assert compared == [
        [sgd, [tmp_path / "mlp-sgd-l2", tmp_path / "mlp-sgd-l2-s1"]],
        [sgd, [tmp_path / "mlp-gadam", tmp_path / "mlp-gadam-s1"]],
    ]


@pytest.mark.slow
def test_the_demo_with_two_seeds_judges_its_claims_on_the_arms(tmp_path):
    config = DemoConfig.reduced(out=tmp_path, device="cpu", models=("logreg",), seeds=2)
    result = demo.run_demo(config)
    assert sorted(result.runs) == [
        "logreg-gadam",
        "logreg-gadam-s1",
        "logreg-sgd",
        "logreg-sgd-l2",
        "logreg-sgd-l2-s1",
        "logreg-sgd-s1",
    ]
    for (_, title), comparison in result.comparisons.items():
        a, b = comparison.runs
        assert a.name == "logreg-sgd" and a.runs == ("logreg-sgd", "logreg-sgd-s1")
        assert b.seeds == 2 and b.name == {"L2 regularisation": "logreg-sgd-l2"}.get(
            title, "logreg-gadam"
        )
        (v,) = [v for v in comparison.verdicts if v.measure == "lambda_max"]
        assert v.accuracy_noise in ("seeds", "binomial", "seeds+binomial", "binomial+seeds")
    pairs = [c for c in result.claims if c.claim in CONTRAST_CLAIMS.values()]
    assert len(pairs) == 2
    for claim in pairs:
        assert "noise" in claim.evidence and "lambda_max" in claim.evidence
        assert len(claim.evidence.split("; ", 1)[-1]) <= 110
