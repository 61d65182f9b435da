"""bench/gpu_scale.py's CPU smoke test: every part of the GPU script runs, at tiny sizes, and reports."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~2 minutes with a cold inductor cache (part 3 compiles), ~15 s warm
def test_the_gpu_script_runs_every_part_on_the_cpu():
    done = subprocess.run([sys.executable, "bench/gpu_scale.py", "--smoke", "--json"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for part in ("lidit_1b", "stage1_llama3_8b", "default_model"):
        assert "error" not in results[part], results[part]
    assert 0.9 < results["lidit_1b"]["counted_over_formula"] < 1.1  # the FLOP formula against FlopCounterMode
    assert results["stage1_llama3_8b"]["rel_l2_vs_plain"] < 0.02  # the encoder's states are the plain loop's
