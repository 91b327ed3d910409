"""`python -m tuning replicate`: runs, claims, figures, report, resume."""

import dataclasses
import json
import math

import keras
import keras_tuner
import numpy as np
import pytest

from tests.test_tuning import once_on
from tuning import claims as rules
from tuning import replicate
from tuning.benchmarks import BENCHMARKS
from tuning.datasets import DatasetUnavailable, load_mnist_arrays

PNG = b"\x89PNG\r\n\x1a\n"


def _mnist_available():
    try:
        load_mnist_arrays("mnist")
        return True
    except DatasetUnavailable:
        return False


needs_mnist = pytest.mark.skipif(
    not _mnist_available(),
    reason="real MNIST (IDX files or mnist.npz) not found; the claims are "
    "never decided on stand-ins",
)


def _reference_counterexample(steps, amsgrad, lr=1e-2):
    """Float64 Algorithm 1 (amsgrad: max of the raw v) + projection."""
    x = m = v = v_max = 0.0
    xs = []
    for t in range(1, steps + 1):
        g = 1010.0 if t % 101 == 1 else -10.0
        m = 0.9 * m + 0.1 * g
        v = 0.99 * v + 0.01 * g * g
        v_max = max(v_max, v)
        v_hat = (v_max if amsgrad else v) / (1 - 0.99 ** t)
        x -= lr * (m / (1 - 0.9 ** t)) / (math.sqrt(v_hat) + 1e-8)
        x = min(1.0, max(-1.0, x))
        xs.append(x)
    return np.array(xs)


def test_counterexample_gradients_are_reddis():
    g = replicate.counterexample_gradients(203)
    assert g[0] == 1010 and g[101] == 1010 and g[202] == 1010
    assert np.all(np.delete(g, [0, 101, 202]) == -10)


@pytest.mark.parametrize("name", ["adam", "amsgrad"])
def test_counterexample_follows_float64_reference(name):
    result = replicate.run_amsgrad(2020, points=20)
    reference = _reference_counterexample(2020, name == "amsgrad")
    t = np.array(result[name]["t"])
    assert t[-1] == 2020 and len(t) == 20
    np.testing.assert_allclose(result[name]["x"], reference[t - 1],
                               atol=2e-4)
    # The projection is active: the reference leaves [-1, 1] without it.
    assert np.all(np.abs(result[name]["x"]) <= 1.0)


# Claim logic on hand-made results: every branch, exact numbers.
def _panel(**finals):
    return {"curves": {k: {"label": k, "loss": [9.0, v]}
                       for k, v in finals.items()}}


NOT_RUN = {"title": "x", "not_run": "Dataset 'imdb' is not cached"}
FIGURE1_CASES = [
    # adam, sgd, adagrad -> like SGD, adam <= adagrad, sgd <= adagrad
    ((0.262, 0.268, 0.281), ["PASS", "PASS", "PASS"]),
    ((0.300, 0.268, 0.281), ["FAIL", "FAIL", "PASS"]),
    ((0.262, 0.290, 0.281), ["FAIL", "PASS", "FAIL"]),
    # Was "inf vs inf" PASS: where both runs diverged nothing is decided.
    ((math.inf, math.inf, 0.281), ["UNDECIDED", "FAIL", "FAIL"]),
    ((math.inf, math.inf, math.inf), ["UNDECIDED"] * 3),
]


@pytest.mark.parametrize("finals,expected", FIGURE1_CASES)
def test_figure1_left_claims(finals, expected):
    adam, sgd, ada = finals
    claims = rules.claims_figure1(
        _panel(adam=adam, sgd_nesterov=sgd, adagrad=ada), NOT_RUN)
    assert [c["result"] for c in claims] == expected + ["NOT RUN"] * 2
    assert claims[1]["detail"].endswith(f"Adam {adam:.4g} vs AdaGrad {ada:.4g}")
    assert "imdb" in claims[3]["detail"]


def test_figure1_right_claims_by_far_and_as_fast():
    right = _panel(adam=0.120, adagrad=0.126, rmsprop=0.167,
                   sgd_nesterov=0.219)
    claims = rules.claims_figure1(NOT_RUN, right)
    assert [c["result"] for c in claims[3:]] == ["PASS", "PASS"]
    right = _panel(adam=0.140, adagrad=0.126, rmsprop=0.167,
                   sgd_nesterov=0.150)  # 16% lower only; Adam 11% worse
    assert [c["result"] for c in
            rules.claims_figure1(NOT_RUN, right)[3:]] == ["FAIL", "FAIL"]


def test_figure2_claim_adam_lowest_within_margin():
    mlp = _panel(adam=0.0245, adagrad=0.024, rmsprop=0.030)
    for key, label in (("adam", "Adam"), ("adagrad", "AdaGrad"),
                       ("rmsprop", "RMSProp")):
        mlp["curves"][key]["label"] = label
    assert rules.claims_figure2(mlp)[0]["result"] == "PASS"
    mlp["curves"]["adam"]["loss"] = [9.0, 0.026]  # 8% above AdaGrad
    claim = rules.claims_figure2(mlp)[0]
    assert claim["result"] == "FAIL" and "Adam 0.026" in claim["detail"]
    for key in mlp["curves"]:
        mlp["curves"][key]["loss"] = [9.0, math.inf]
    assert rules.claims_figure2(mlp)[0]["result"] == "UNDECIDED"


def test_figure3_claims_early_and_late():
    curves = {}
    for suffix in ("", "_dropout"):
        for key, first, last in (("adam", 1.5, 0.01), ("adagrad", 1.6, 0.2),
                                 ("sgd_nesterov", 2.0, 0.02)):
            curves[key + suffix] = {"label": key, "loss": [first, last]}
    claims = rules.claims_figure3({"curves": curves})
    assert [c["result"] for c in claims] == ["PASS", "PASS"]
    curves["adagrad_dropout"]["loss"] = [2.1, 0.021]
    assert [c["result"] for c in
            rules.claims_figure3({"curves": curves})] == ["FAIL", "FAIL"]
    for key in curves:
        curves[key]["loss"] = [math.inf, math.inf]
    assert [c["result"] for c in
            rules.claims_figure3({"curves": curves})] == ["UNDECIDED"] * 2


def _grid(fn):
    runs = []
    for b1 in (0.0, 0.9):
        for b2 in (0.99, 0.999, 0.9999):
            for a in (-5, -4, -3, -2, -1):
                for bc in (True, False):
                    early, late = fn(b1, b2, a, bc)
                    runs.append({"beta_1": b1, "beta_2": b2,
                                 "log10_alpha": a, "bias_correction": bc,
                                 "early": early, "late": late})
    return {"runs": runs}


def test_figure4_claims_on_a_paper_like_grid():
    def paper_like(b1, b2, a, bc):
        loss = 100.0 + abs(a + 3) * 10
        if not bc and b2 == 0.9999 and a >= -3:
            return ((math.inf, 1.2 * loss) if a == -1
                    else (2 * loss, loss))
        return loss, loss

    claims = rules.claims_figure4(_grid(paper_like))
    assert [c["result"] for c in claims] == ["PASS"] * 5
    assert claims[4]["detail"] == ("12/12 hold; e.g. late b1=0.9 "
                                   "b2=0.9999: 100 vs 100")
    assert claims[0]["detail"] == "60/60 points hold"
    assert "early b2=0.9999: 6" in claims[2]["detail"]
    assert "late b2=0.9999: 2" in claims[2]["detail"]


def test_figure4_claims_fail_where_uncorrected_wins():
    def uncorrected_better(b1, b2, a, bc):
        return (90.0, 90.0) if not bc and a == -5 else (100.0, 100.0)

    claims = rules.claims_figure4(_grid(uncorrected_better))
    assert [c["result"] for c in claims] == ["FAIL"] * 5
    assert claims[4]["detail"].startswith("0/12 hold; exceptions: early "
                                          "b1=0.0 b2=0.99: 100 vs 90;")
    assert claims[0]["detail"].startswith("48/60 points hold; exceptions: ")
    # Was: points where both diverged counted as holding (PASS); they
    # decide nothing, and a grid of nothing else decides nothing.
    both = rules.claims_figure4(_grid(lambda *p: (math.inf, math.inf)))
    assert [c["result"] for c in both] == ["UNDECIDED"] * 5


def test_figure4_tally_leaves_out_points_where_both_diverged():
    def some_diverge(b1, b2, a, bc):
        return (math.inf, math.inf) if a == -1 else (100.0, 100.0)

    claims = rules.claims_figure4(_grid(some_diverge))
    assert claims[0]["result"] == "PASS"
    assert claims[0]["detail"] == (
        "48/48 points hold; 12 points where both diverged not counted")


def test_amsgrad_claims():
    result = {"adam": {"x": [0.5, 0.95]}, "amsgrad": {"x": [0.1, -0.2]}}
    assert [c["result"] for c in rules.claims_amsgrad(result)] == [
        "PASS", "PASS"]
    result["adam"]["x"][-1] = 0.89
    claims = rules.claims_amsgrad(result)
    assert claims[0]["result"] == "FAIL" and claims[0]["detail"] == (
        "x_T = 0.8900")


def test_every_optimizer_starts_from_the_same_weights():
    bench = BENCHMARKS["mnist_mlp"]
    weights = []
    for key in ("adam", "sgd_nesterov", "adadelta"):
        model = replicate.ReplicaHyperModel(
            bench, (784,), replicate.COMPETITORS[key], seed=3,
        ).build(keras_tuner.HyperParameters())
        weights.append([np.array(w) for w in model.get_weights()])
    for other in weights[1:]:
        for a, b in zip(weights[0], other):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("budget", [2, 6, 12])
def test_every_optimizer_gets_the_same_budget(budget):
    for key, competitor in replicate.COMPETITORS.items():
        grid = competitor.grid(budget)
        assert math.prod(len(v) for v in grid.values()) == budget, key
        rates = np.array(grid["learning_rate"])
        low, high = competitor.learning_rate
        if len(rates) == 1:  # SGDNesterov at budget 2: the middle rate
            assert rates[0] == float(f"{math.sqrt(low * high):.3g}")
            continue
        assert rates[0] == low and rates[-1] == high
        np.testing.assert_allclose(np.diff(np.log10(rates)),
                                   np.log10(high / low) / (len(rates) - 1),
                                   atol=2e-3)
    assert replicate.COMPETITORS["adam"].grid(6)["learning_rate"] == [
        1e-4, 3.98e-4, 1.58e-3, 6.31e-3, 0.0251, 0.1]
    assert replicate.COMPETITORS["sgd_nesterov"].grid(6) == {
        "learning_rate": [1e-3, 0.0316, 1.0], "momentum": [0.9, 0.99]}


def test_grid_values_build_the_optimizer():
    hp = keras_tuner.HyperParameters()
    values = replicate.COMPETITORS["sgd_nesterov"].declare(hp, 6)
    assert values == {"learning_rate": 1e-3, "momentum": 0.9}
    optimizer = replicate.COMPETITORS["sgd_nesterov"].make(**values)
    assert optimizer.nesterov and optimizer.momentum == 0.9


def test_bad_figure_or_scale_is_refused():
    with pytest.raises(ValueError, match=r"Argument `figure` must be one of "
                       r"1, 2, 3, 4, amsgrad, all. Received: figure='5'"):
        replicate.replicate("5", "tiny")
    with pytest.raises(ValueError, match="Argument `scale` must be one of "
                       "tiny, quick, full. Received: scale='huge'"):
        replicate.replicate("1", "huge")


def _stand_in(shape, classes, n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 255, size=(n, *shape), dtype=np.uint8)
    y = rng.integers(0, classes, size=(n,))
    return (x, y), (x[:16], y[:16])


@once_on("torch")
def test_stand_in_data_is_marked_not_evidence(tmp_path):
    """IMDB: code path on generated sequences, labelled as stand-in."""
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(1, 10000, size=30)) for _ in range(64)]
    labels = rng.integers(0, 2, size=64)
    panel = replicate.PANELS["1"][1]
    result = replicate.run_panel(
        panel, replicate.Scale(64, 2, 2), tmp_path, arrays=(
            (seqs, labels), (seqs[:16], labels[:16])))
    assert result["data"].startswith("stand-in arrays")
    assert set(result["curves"]) == set(panel.optimizers)
    for curve in result["curves"].values():
        assert len(curve["loss"]) == 2 and len(curve["epoch_seconds"]) == 2
    # Budget 2: Adam's two rates are both grid ends, SGD has one rate.
    assert result["curves"]["adam"]["at_edge"] is True
    assert result["curves"]["sgd_nesterov"]["at_edge"] is False
    # alpha/sqrt(t) on the logistic regression: Adam's grid a decade up.
    assert [t["hp"]["learning_rate"] for t in
            result["curves"]["adam"]["trials"]] == [1e-3, 1.0]
    # Another seed into the same folder trains afresh (was: seed 0's runs
    # reported as seed 1's); seed 0 again retrains nothing.
    other = replicate.run_panel(
        panel, replicate.Scale(64, 2, 2), tmp_path, seed=1, arrays=(
            (seqs, labels), (seqs[:16], labels[:16])))
    assert other["curves"]["adam"]["loss"] != result["curves"]["adam"]["loss"]
    again = replicate.run_panel(
        panel, replicate.Scale(64, 2, 2), tmp_path, arrays=(
            (seqs, labels), (seqs[:16], labels[:16])))
    assert again["curves"] == result["curves"]


def test_unavailable_dataset_is_reported_not_run(tmp_path, monkeypatch,
                                                 capsys):
    reason = ("Dataset 'cifar10' is not cached and could not be downloaded "
              "(URLError: no network). Without a network, place "
              "cifar-10-python.tar.gz in /home/me/.keras/datasets/ (or set "
              "KERAS_HOME to a folder whose datasets/ holds it).")

    def missing(*args, **kwargs):
        raise DatasetUnavailable(reason)

    bench = dataclasses.replace(BENCHMARKS["cifar10_cnn"], load=missing)
    monkeypatch.setitem(BENCHMARKS, "cifar10_cnn", bench)
    # Nothing ran: an error, exit status 1 (was 0, as if it had run).
    code = replicate.main(["--figure", "3", "--scale", "tiny",
                           "--directory", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 1
    assert err == (
        "python -m tuning replicate: error: nothing ran: every panel's data "
        "is missing (NOT RUN above says which file goes where); put it "
        "there, then rerun the same command\n")
    text = (tmp_path / "report.md").read_text()
    assert text.count("**NOT RUN**") == 2
    # Plainly: the dataset, the file, the folder, and what to do then
    # (was Keras's download error in the middle of one long sentence).
    plain = ("needs the cifar10 dataset, which is not in "
             "/home/me/.keras/datasets/ and cannot be downloaded (URLError: "
             "no network). To run it: put cifar-10-python.tar.gz in that "
             "folder (or set KERAS_HOME to a folder whose datasets/ holds "
             "it), then rerun the same command.")
    assert f"- CIFAR-10 ConvNet: **not run**: {plain}" in text
    # Once, with the reason (was: again on each of its claims' lines).
    assert [line for line in out.splitlines()
            if line.startswith("NOT RUN")] == [
        f"NOT RUN  CIFAR-10 ConvNet: {plain}"]
    assert (tmp_path / "figure3.png").read_bytes().startswith(PNG)
    # Something ran (the AMSGrad counterexample needs no data): exit 0,
    # and a next step.
    monkeypatch.setitem(replicate.AMSGRAD_STEPS, "tiny", 202)
    code = replicate.main(["--figure", "amsgrad", "--scale", "tiny",
                           "--directory", str(tmp_path)])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert out.splitlines()[-2:] == [
        f"report: {tmp_path / 'report.md'}",
        "next step: read the report; for the paper's settings, rerun with "
        "--scale full (hours: the paper's epochs and all the data)"]
    # Adam's drift to +1 needs more than tiny's steps (was: FAIL).
    ran = json.loads((tmp_path / "figureamsgrad.json").read_text())
    assert [c["result"] for c in ran["claims"]][0] == "UNDECIDED"
    assert ran["claims"][1]["result"] in ("PASS", "FAIL")


@once_on("tensorflow")
@needs_mnist
def test_tiny_replication_draws_figures_and_decides_claims(tmp_path):
    path = replicate.replicate(("1", "2", "4", "amsgrad"), "tiny", tmp_path)
    text = path.read_text()
    for figure in ("1", "2", "4", "amsgrad"):
        assert (tmp_path / f"figure{figure}.png").read_bytes().startswith(PNG)
        saved = json.loads((tmp_path / f"figure{figure}.json").read_text())
        for i, claim in enumerate(saved["claims"]):
            # Was PASS/FAIL: tiny decides no claim of figures 1-4, nor
            # Adam's drift to +1 (read FAIL at 2,020 steps).
            assert claim["result"] in (
                ("PASS", "FAIL") if (figure, i) == ("amsgrad", 1) else
                ("UNDECIDED", "NOT RUN")), claim
            row = (f"| {figure} | {claim['claim']} | **{claim['result']}** "
                   f"| {claim['detail']} |")
            assert row in text
    # MNIST claims are decided (real data), and their numbers are the runs'.
    figure1 = json.loads((tmp_path / "figure1.json").read_text())
    mnist = figure1["panels"][0]
    assert mnist["data"] == "mnist (subset 512/60000)"
    assert [c["result"] == "UNDECIDED" and c["detail"].startswith(
        "scale tiny cannot decide it (would read ")
        for c in figure1["claims"][:3]] == [True] * 3
    # alpha/sqrt(t) on the logistic regression: Adam's grid a decade up.
    assert [t["hp"]["learning_rate"] for t in
            mnist["curves"]["adam"]["trials"]] == [1e-3, 1.0]
    adam = mnist["curves"]["adam"]["loss"][-1]
    assert f"Adam {adam:.4g} vs AdaGrad" in figure1["claims"][1]["detail"]
    grid = json.loads((tmp_path / "figure4.json").read_text())["grid"]
    assert len(grid["runs"]) == 8
    assert "smoke test" in text and "Wall time" in text
    assert replicate.CAVEATS["2"] in text
    # Running a figure again (a resume) adds its time to the saved total.
    before = json.loads((tmp_path / "figureamsgrad.json").read_text())
    replicate.replicate("amsgrad", "tiny", tmp_path)
    after = json.loads((tmp_path / "figureamsgrad.json").read_text())
    assert after["wall_seconds_total"] == pytest.approx(
        before["wall_seconds_total"] + after["wall_seconds"])


@once_on("jax")
@needs_mnist
def test_figure4_resumes_from_saved_runs(tmp_path, monkeypatch):
    first = replicate.run_figure4(replicate.GRID_SCALES["tiny"], tmp_path)

    def must_not_train(*args, **kwargs):
        raise AssertionError("a saved run was trained again")

    monkeypatch.setattr(replicate, "_vae_run", must_not_train)
    again = replicate.run_figure4(replicate.GRID_SCALES["tiny"], tmp_path)
    assert json.dumps(again["runs"]) == json.dumps(first["runs"])  # NaN-safe
    # A different scale does not reuse them.
    other = replicate.GridScale(100, (1, 2), (-3,), beta_1s=(0.9,),
                                beta_2s=(0.99,))
    with pytest.raises(AssertionError, match="trained again"):
        replicate.run_figure4(other, tmp_path)


def test_cli_routes_to_replicate(capsys):
    from tuning.cli import main

    with pytest.raises(SystemExit):
        main(["replicate", "--figure", "7"])
    assert "invalid choice: '7'" in capsys.readouterr().err


def test_report_is_rebuilt_from_saved_results(tmp_path):
    result = {"figure": "amsgrad", "scale": "quick", "seed": 0,
              "backend": keras.backend.backend(), "wall_seconds": 12.0,
              "run": {"steps": 20000, "learning_rate": 0.01,
                      "adam": {"t": [1, 2], "x": [0.1, 0.95]},
                      "amsgrad": {"t": [1, 2], "x": [0.0, -0.1]}}}
    result["claims"] = rules.claims_amsgrad(result["run"])
    result["caveat"] = "fewer steps"
    (tmp_path / "figureamsgrad.json").write_text(json.dumps(result))
    text = replicate.write_report(tmp_path).read_text()
    assert "Totals: PASS 2" in text and "smoke test" not in text
    assert "- Figure amsgrad (scale `quick`): fewer steps" in text
    assert "Wall time: 12 s in all" in text
    assert "| amsgrad | AMSGrad counterexample: Adam ends near +1" in text
