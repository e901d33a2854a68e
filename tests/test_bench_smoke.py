"""`make bench` keeps working: its script runs end to end in quick mode and writes its report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_script_quick_run(default_model_dir, tmp_path):
    out_md, out_json = tmp_path / "bench.md", tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO_ROOT / "scripts/bench_engine.py"), "--quick", "--threads", "1",
           "--model", str(default_model_dir), "--output", str(out_md), "--json", str(out_json)]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = out_md.read_text()
    assert "Throughput" in report and "100/10/10" in report and "ratio" in report.lower()
    assert json.loads(out_json.read_text())
