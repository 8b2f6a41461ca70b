"""The one-command GPU report in its smoke mode (tiny shapes, on CPU here): it runs end to
end, a failing stage does not stop the others, and an exhausted budget leaves the finished
stages' files and a report saying what was skipped."""

import csv
import dataclasses

from benchmarks import gpu_report


def stage_outcomes(text: str) -> dict[str, str]:
    rows = text.split("## Stages", 1)[1].split("## Targets", 1)[0].splitlines()
    cells = [row.split("|") for row in rows if row.startswith("| ") and not row.startswith("| stage")]
    return {cell[1].strip(): cell[2].strip() for cell in cells}


def test_smoke_report_writes_markdown_csv_and_png(tmp_path):
    assert gpu_report.main(["--smoke", "--out-dir", str(tmp_path)]) == 0
    (markdown,) = tmp_path.glob("*.md")
    text = markdown.read_text()
    assert stage_outcomes(text) == {stage.name: "done" for stage in gpu_report.STAGES}
    for section in ("## Targets", "## Environment", "## Parity", "## Speed", "## Per-kernel profile",
                    "## Decode and host cost", "## LoRAFusion sweep", "## Saved for backward", "## DoRA fwd+bwd (ms)",
                    "## QLoRA (ms)", "## Mixed batches (ms, forward)",
                    "## GPU tests",
                    "## End to end", "## AUTO_ON_CUDA supported by this run"):
        assert section in text, section
    target_rows = [line for line in text.splitlines() if line.endswith("| met |") or line.endswith("| **not met** |")]
    assert len(target_rows) >= 20
    assert text.index("## Targets") < text.index("## Environment")
    assert "lora_grad_a_kernel" in text.split("## Parity", 1)[1]  # the kernels that ran are listed
    assert "AUTO_ON_CUDA = {" in text and "('decode', 'r<=16')" in text
    rows = list(csv.DictReader(markdown.with_suffix(".csv").open()))
    assert {row["section"] for row in rows} == {"speed", "sweep", "decode", "dora", "qlora", "qlora-decode"}
    assert all(float(row["median_ms"]) > 0 for row in rows)
    assert markdown.with_suffix(".png").stat().st_size > 0


def test_a_failing_stage_is_recorded_and_the_next_runs(tmp_path, monkeypatch):
    def broken(report):
        raise RuntimeError("boom")

    stages = [dataclasses.replace(s, run=broken) if s.name == "parity" else s for s in gpu_report.STAGES]
    monkeypatch.setattr(gpu_report, "STAGES", stages)
    assert gpu_report.main(["--smoke", "--out-dir", str(tmp_path), "--stages", "environment", "parity", "saved"]) == 0
    (markdown,) = tmp_path.glob("*.md")
    outcomes = stage_outcomes(markdown.read_text())
    assert outcomes["environment"] == "done" and outcomes["saved"] == "done"
    assert outcomes["parity"].startswith("**failed**: RuntimeError: boom")
    assert "## Saved for backward" in markdown.read_text()


def test_an_exhausted_budget_skips_stages_and_keeps_what_finished(tmp_path):
    assert gpu_report.main(["--smoke", "--out-dir", str(tmp_path), "--budget", "3",
                            "--stages", "environment", "speed", "saved"]) == 0
    (markdown,) = tmp_path.glob("*.md")
    outcomes = stage_outcomes(markdown.read_text())
    assert outcomes["environment"] == "done" and outcomes["saved"] == "done"
    assert outcomes["speed"].startswith("skipped: predicted 15 s")
    assert not markdown.with_suffix(".csv").exists()  # the skipped speed stage wrote no rows
