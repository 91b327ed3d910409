"""benchmarks/: the scripts run and print what they claim to measure.

step_time.py prints same-run ratios (issue 24's 4 groups against one
group, 8-bit state against float32 state): a chosen row is timed beside
its peer and the labels the command line offers are the rows that exist,
not how fast anything is. low_bit_quality.py trains each state format from
the same start: its smoke run gives a row per format with the ratio to
float32 state, and its table averages over seeds. low_bit_peers.py names
a peer it could not time.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest

from tests.test_tuning import once_on

ROOT = Path(__file__).resolve().parent.parent


def _script(name):
    spec = importlib.util.spec_from_file_location(
        name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


step_time = _script("step_time")
low_bit_quality = _script("low_bit_quality")


def test_the_command_line_offers_every_row_and_each_peer_exists():
    variants = step_time.keras_variants()
    assert tuple(variants) == step_time.keras_variants_labels()
    for label, (_, peer) in variants.items():
        assert peer is None or peer in variants, label
    assert step_time.peer_of("AdamPlus 4 groups (XLA)", [
        "AdamPlus (XLA)", "AdamPlus 4 groups (XLA)"]) == "AdamPlus (XLA)"
    assert step_time.peer_of("AdamPlus 8bit", ["AdamPlus"]) == "AdamPlus"


# The command line is backend-independent: one backend's run checks it.
@once_on("jax")
def test_a_chosen_row_is_timed_beside_its_peer_only(tmp_path):
    backend = keras.backend.backend()
    out = tmp_path / "tables.json"
    process = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "step_time.py"),
         "--backend", backend, "--quick", "--repeats", "1", "--no-fit",
         "--case", "1M x 100", "--variant", "AdamPlus",
         "--variant", "AdamPlus 8bit", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert process.returncode == 0, process.stderr[-2000:]
    (table,) = json.loads(out.read_text())
    (row,) = table["rows"]
    assert row["case"] == "1M x 100"
    labels = {label.split(" (")[0] for label in row["times"]}
    assert labels == {"AdamPlus", "AdamPlus 8bit"}
    assert all(seconds > 0 for seconds in row["times"].values())
    assert "| 1M x 100 | AdamPlus 8bit" in process.stdout


@pytest.mark.parametrize("argv", [["--variant", "nope"],
                                  ["--case", "nope"]])
def test_an_unknown_row_or_case_is_refused(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        step_time.main(argv)
    assert exit.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("case", list(step_time.QUICK_CASES))
def test_the_quick_cases_are_choices_of_case(case, capsys):
    # Were refused by `--case` although `--quick` runs them; `--help`
    # stops the run once `--case` has been read.
    with pytest.raises(SystemExit) as exit:
        step_time.main(["--case", case, "--quick", "--help"])
    assert exit.value.code == 0, capsys.readouterr().err


# On torch, the backend with the shortest test run (CI's budget).
@once_on("torch")
def test_the_quality_smoke_run_gives_each_format_a_ratio(tmp_path):
    out = tmp_path / "rows.json"
    process = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "low_bit_quality.py"),
         "--backend", keras.backend.backend(), "--small", "--model",
         "transformer", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert process.returncode == 0, process.stderr[-2000:]
    rows = json.loads(out.read_text())[keras.backend.backend()]
    formats = [row["format"] for row in rows]
    assert formats[0] == "native" and "8bit" in formats
    for row in rows:
        assert not row["diverged"] and 1.0 < row["loss"] < 10.0
    bytes_ = {row["format"]: row["bytes_per_param"] for row in rows}
    # Two float32 moments; the step count's few bytes round away.
    assert abs(bytes_["native"] - 8.0) < 0.01
    assert bytes_["8bit"] < 2.5
    assert "| transformer | 8bit |" in process.stdout


low_bit_peers = _script("low_bit_peers")


def test_the_quality_table_averages_each_format_over_its_seeds(capsys):
    rows = [
        {"model": "mlp", "format": "native", "seed": 0, "loss": 0.2,
         "diverged": False, "bytes_per_param": 8.0},
        {"model": "mlp", "format": "8bit", "seed": 0, "loss": 0.21,
         "diverged": False, "bytes_per_param": 2.04},
        {"model": "mlp", "format": "native", "seed": 1, "loss": 0.4,
         "diverged": False, "bytes_per_param": 8.0},
        {"model": "mlp", "format": "8bit", "seed": 1, "loss": 0.38,
         "diverged": False, "bytes_per_param": 2.04},
        {"model": "mlp", "format": "native", "seed": 2, "loss": 0.3,
         "diverged": False, "bytes_per_param": 8.0},
        {"model": "mlp", "format": "8bit", "seed": 2,
         "loss": float("nan"), "diverged": True, "bytes_per_param": 2.04},
    ]
    low_bit_quality.print_table("jax", rows)
    out = capsys.readouterr().out
    # Ratios per seed 1.05 and 0.95 (the diverged run is counted apart).
    assert "| mlp | 8bit | 3 | 0.2950 | 1.0000 (0.9500-1.0500) | 1 | 2.04 |" \
        in out
    assert "| mlp | native | 3 | 0.3000 | 1.0000 (1.0000-1.0000) | 0 | " \
        "8.00 |" in out


def test_a_torch_peer_that_does_not_import_is_not_run(monkeypatch, capsys):
    monkeypatch.setitem(low_bit_quality.TORCH_PEERS, "nope 8bit",
                        ("no_such_module_here", "Adam8bit"))
    assert low_bit_quality.torch_peer("nope 8bit", 1e-3) is None
    assert "# nope 8bit: not run (ModuleNotFoundError" in \
        capsys.readouterr().err


@pytest.mark.parametrize("script, argv, message", [
    (low_bit_quality, ["--seeds", "0"],
     "argument --seeds: must be at least 1, got 0"),
    (low_bit_peers, ["--rounds", "0"],
     "argument --rounds: must be at least 1, got 0"),
    (low_bit_peers, ["--steps", "-1"],
     "argument --steps: must be at least 1, got -1"),
])
def test_a_count_under_one_is_refused(script, argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        script.main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_the_peer_table_names_a_peer_it_could_not_time(capsys):
    low_bit_peers._print("1M x 1", {
        "AdamPlus": 0.01, "AdamPlus 8bit": 0.05,
        "torchao Adam8bit": 0.1,
        "bitsandbytes Adam8bit": "ModuleNotFoundError: no bitsandbytes"})
    out = capsys.readouterr().out
    assert "| AdamPlus 8bit | 50.0 | 1.00 | 5.00 |" in out
    assert "| torchao Adam8bit | 100.0 | 2.00 | 10.00 |" in out
    assert "| bitsandbytes Adam8bit | not timed (ModuleNotFoundError: " \
        "no bitsandbytes) | | |" in out
