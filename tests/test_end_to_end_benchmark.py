"""The end-to-end benchmark runs (quick, CPU), checks fastlora against PEFT and writes its CSV."""

import csv

from benchmarks import end_to_end


def test_end_to_end_quick_writes_rows(tmp_path):
    path = tmp_path / "e2e.csv"
    assert end_to_end.main(["--quick", "--device", "cpu", "--dropout", "0.1", "--csv", str(path)]) == 0
    rows = list(csv.DictReader(path.open()))
    assert [row["provider"] for row in rows] == ["frozen", "peft", "fastlora", "peft-qlora", "fastlora-qlora"]
    assert all(row["status"] == "ok" and float(row["tokens_per_s"]) > 0 for row in rows)
    saved = {row["provider"]: int(row["saved_bytes"]) for row in rows}
    assert saved["fastlora"] < saved["peft"] and saved["fastlora-qlora"] < saved["peft-qlora"]


def test_providers_are_warmed_then_interleaved_in_rotating_order():
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    samples = end_to_end.interleaved_step_times(steps, "cpu", budget_s=0.0, warmup=2, min_rounds=3)
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]  # warm-up, untimed
    assert calls[6:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {name: len(times) for name, times in samples.items()} == {"a": 3, "b": 3, "c": 3}
