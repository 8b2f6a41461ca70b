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
