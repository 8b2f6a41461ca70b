"""The one-command GPU report runs end to end in its smoke mode (tiny shapes, on CPU here)."""

import csv

from benchmarks import gpu_report


def test_smoke_report_writes_markdown_csv_and_png(tmp_path):
    assert gpu_report.main(["--smoke", "--out-dir", str(tmp_path)]) == 0
    (markdown,) = tmp_path.glob("*.md")
    text = markdown.read_text()
    for section in ("## DESIGN.md targets", "## Tests", "## Parity", "## Speed", "LoRAFusion sweep", "Decode forward",
                    "Host time per eager fwd+bwd", "Saved for backward", "## End to end"):
        assert section in text, section
    target_rows = [line for line in text.splitlines() if line.endswith("| met |") or line.endswith("| **not met** |")]
    assert len(target_rows) >= 20
    assert text.index("## DESIGN.md targets") < text.index("## Tests")
    rows = list(csv.DictReader(markdown.with_suffix(".csv").open()))
    assert {row["section"] for row in rows} == {"speed", "sweep", "decode"}
    assert all(float(row["median_ms"]) > 0 for row in rows)
    assert markdown.with_suffix(".png").stat().st_size > 0
