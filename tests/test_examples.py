"""The examples run as a user runs them (short settings) and produce what they promise."""

import subprocess
import sys
from pathlib import Path

import fastlora.peft

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_finetune_digits(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "finetune_digits.py"), "--epochs", "3", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    for line in ("before ", "after ", "trainable parameters:", "adapter file:"):
        assert line in result.stdout
    assert (tmp_path / "confusion.png").stat().st_size > 10_000
    config, tensors = fastlora.peft.read_adapter(tmp_path / "adapter")
    assert sorted(config["target_modules"]) == ["fc1", "fc2", "fc3"]
    assert len(tensors) == 6
