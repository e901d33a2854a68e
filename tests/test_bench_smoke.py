"""`make bench` keeps working: its scripts run end to end in quick mode and write their report sections."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_quick(script: str, model_dir: Path, out_md: Path, out_json: Path) -> None:
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / script), "--quick", "--threads", "1", "--device", "cpu",
           "--model", str(model_dir), "--output", str(out_md), "--json", str(out_json)]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(out_json.read_text())


@pytest.mark.slow
def test_bench_scripts_quick_run_and_share_one_report(default_model_dir, tmp_path):
    out_md = tmp_path / "bench.md"
    run_quick("bench_engine.py", default_model_dir, out_md, tmp_path / "engine.json")
    run_quick("bench_lora.py", default_model_dir, out_md, tmp_path / "lora.json")
    run_quick("bench_server.py", default_model_dir, out_md, tmp_path / "server.json")
    run_quick("bench_engine.py", default_model_dir, out_md, tmp_path / "engine.json")  # rewrites only its section
    report = out_md.read_text()
    assert report.startswith("# Benchmarks")
    assert all(report.count(f"<!-- section:{name} -->") == 1 for name in ("engine", "lora", "server"))
    assert report.index("section:engine") < report.index("section:lora") < report.index("section:server")
    assert "Throughput" in report and "100/10/10" in report and "ratio" in report.lower()
    assert "distinct adapters" in report and "PEFT `load_adapter`" in report
    assert "Adapter cold start: request to first token" in report and "cold: registered, never requested" in report
    assert "](img/lora_adapters_per_batch.png)" in report and (tmp_path / "img" / "lora_adapters_per_batch.png").stat().st_size > 0
    cold = json.loads((tmp_path / "lora.json").read_text())["cold"]
    assert cold["adapter_cache"]["misses"] == len(cold["seconds"]["cold"])  # each cold request loaded from the store
    assert "over HTTP (seed 000)" in report and "`AsyncClient.generate_many(prompts, concurrency=16)`" in report
