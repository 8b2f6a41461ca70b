"""The benchmark suite runs every provider in every mode (on CPU, tiny shapes): the main job
of the README must not crash on any provider, compiled ones included."""

import csv

import pytest

from benchmarks import harness, run
from benchmarks.providers import ALL_PROVIDERS, Shape, unavailable_reason


def runnable_here() -> list[str]:
    return [name for name in ALL_PROVIDERS if unavailable_reason(name, "cpu") is None]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_every_provider_runs_in_every_mode(dropout):
    shape = Shape(M=20, K=24, N=16, r=4, dropout=dropout, bias=True)
    providers = runnable_here()
    rows = run.run_case(shape, providers, list(harness.MODES), "cpu", run.torch.float32, budget_s=0.01)
    assert {(row["provider"], row["mode"]) for row in rows} == {(p, m) for p in providers for m in harness.MODES}
    for row in rows:
        assert row["status"] == "ok", row
        assert row["median_ms"] > 0 and row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert row["first_call_s"] > 0
    assert {"reference-compiled", "fastlora-qlora-cpp", "fastlora-qlora-triton", "peft-qlora"} <= set(providers)


def test_providers_are_warmed_then_interleaved_in_rotating_order():
    calls = []
    samplers = {name: (lambda name=name: calls.append(name) or float(len(calls))) for name in ("a", "b", "c")}
    samples = harness.time_interleaved(samplers, budget_s=0.0, warmup=2, min_rounds=3)
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]  # warm-up, untimed
    assert calls[6:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert samples == {"a": [7.0, 12.0, 14.0], "b": [8.0, 10.0, 15.0], "c": [9.0, 11.0, 13.0]}


def test_ratios_pair_samples_of_the_same_round():
    """A round slowed 10x for everyone leaves the per-round ratio alone; ratios of medians
    taken from separate blocks of repeats would not be."""
    ours, peer = [1.0, 10.0, 1.0, 10.0, 10.0], [2.0, 20.0, 2.0, 20.0, 20.0]
    assert harness.paired_ratio(ours, peer) == 0.5
    assert harness.summarize(ours) == {"median_ms": 10.0, "p20_ms": 1.0, "p80_ms": 10.0, "min_ms": 1.0, "rounds": 5}


def test_rows_carry_median_minimum_and_paired_ratios():
    shape = Shape(M=20, K=24, N=16, r=4, dropout=0.0, bias=False)
    rows = run.run_case(shape, ["base", "peft", "fastlora-torch"], ["fwd"], "cpu", run.torch.float32, budget_s=0.01)
    for row in rows:
        assert row["min_ms"] <= row["median_ms"] and row["rounds"] >= run.MIN_ROUNDS
    assert {row["provider"]: row["vs_base"] for row in rows}["base"] == 1.0


def test_csv_of_an_older_suite_gains_the_new_columns(tmp_path):
    path = tmp_path / "results.csv"
    run.append_csv(path, [{"provider": "old", "median_ms": 1.0}], ["provider", "median_ms"])
    run.append_csv(path, [{"provider": "new", "median_ms": 2.0, "min_ms": 1.5}], ["provider", "median_ms", "min_ms"])
    rows = list(csv.DictReader(path.open()))
    assert rows == [{"provider": "old", "median_ms": "1.0", "min_ms": ""},
                    {"provider": "new", "median_ms": "2.0", "min_ms": "1.5"}]


def test_main_writes_the_csv(tmp_path):
    path = tmp_path / "results.csv"
    assert run.main(["--shapes", "16x24x16x4@0.1", "--providers", "base", "fastlora", "--budget", "0.01",
                     "--csv", str(path), "--no-plot", "--device", "cpu"]) == 0
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 2 * len(harness.MODES)
    assert all(row["status"] == "ok" and float(row["first_call_s"]) > 0 for row in rows)


def test_main_with_one_mode_plots_that_mode(tmp_path):
    path = tmp_path / "results.csv"
    assert run.main(["--shapes", "16x24x16x4", "32x24x16x4", "--providers", "base", "peft", "fastlora-torch",
                     "--budget", "0.01", "--modes", "fwd", "--csv", str(path), "--device", "cpu"]) == 0
    for suffix in ("time", "speedup", "memory"):
        assert (tmp_path / f"results-{suffix}.png").stat().st_size > 0


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--shapes", "0x24x16x4"], "M, K, N and r >= 1"),
        (["--shapes", "16x24x16x0"], "M, K, N and r >= 1"),
        (["--shapes", "16x24x16x4@1.0"], "dropout in [0, 1)"),
        (["--shapes", "16x24x16x4@1.5.2"], "not a number"),
        (["--providers", "pefty"], "invalid choice"),
        (["--providers", "fastlora-triton"], "fastlora-triton cannot run on cpu"),
        (["--device", "cuda"], "no CUDA GPU"),
        (["--budget", "0"], "> 0"),
    ],
)
def test_bad_arguments_are_argparse_errors(argv, message, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # fastlora-triton cannot run on this CPU then
    with pytest.raises(SystemExit) as info:
        run.main(argv + ["--no-plot"])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_plot_names_a_missing_or_unreadable_csv(tmp_path, capsys):
    from benchmarks import plot

    for path, message in ((tmp_path / "none.csv", "no results CSV"), (tmp_path / "bad.csv", "not a benchmarks.run CSV")):
        if path.name == "bad.csv":
            path.write_text("a,b\n1,2\n")
        with pytest.raises(SystemExit) as info:
            plot.main([str(path)])
        err = capsys.readouterr().err
        assert info.value.code == 2 and message in err and str(path) in err


def test_default_results_go_to_an_ignored_folder():
    import subprocess

    target = run.LOCAL_RESULTS / "x.csv"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(target)], cwd=run.LOCAL_RESULTS.parent)
    assert ignored.returncode == 0 and run.LOCAL_RESULTS != run.RESULTS


def test_mixed_batch_benchmark_quick_writes_rows(tmp_path):
    from benchmarks import mixed_batch

    path = tmp_path / "mixed.csv"
    assert mixed_batch.main(["--quick", "--device", "cpu", "--csv", str(path)]) == 0
    rows = list(csv.DictReader(path.open()))
    assert [(row["adapters"], row["provider"]) for row in rows] == [
        (n, p) for n in ("1", "16") for p in ("one-adapter", "fastlora", "loop", "peft")]
    assert all(row["status"] == "ok" and float(row["median_ms"]) > 0 for row in rows)
