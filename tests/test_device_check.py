"""bench/device_check.sh without CUDA: a dry run that says what it would run and exits 0."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is what a CPU machine does")
def test_device_check_is_a_quick_dry_run_without_cuda() -> None:
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "device_check.sh")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "dry run: this machine has no CUDA" in done.stdout
    for part in ("(a) python3 -m pytest -m cuda", "1,280,000 x 512", "bf16-mixed", "(d) peak"):
        assert part in done.stdout
