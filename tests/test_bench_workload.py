"""scripts/bench_workload.py: the trace it draws, and a tiny sweep end to end on the tiny random Llama."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import bench_workload  # noqa: E402
from bench_report import write_section  # noqa: E402
from bench_workload import OpenLoopWorkload, RequestDraws  # noqa: E402

POINT_KEYS = {"system", "num_adapters", "alpha", "rate", "num_requests", "completed", "makespan_s", "req_s", "tok_s",
              "ttft_p50", "ttft_p99", "latency_p50", "latency_p99", "tpot_mean", "slo_attainment", "requests"}
CACHE_KEYS = {"disk_loads", "slot_loads", "slot_evictions", "host_evictions", "preemptions", "mean_batch_size"}


def _fields(r: bench_workload.TraceRequest) -> tuple:
    return r.arrival, r.adapter_id, tuple(r.prompt_token_ids), r.max_tokens


def test_points_share_one_draw_with_poisson_times_and_power_law_popularity():
    w = OpenLoopWorkload(rates=(50.0, 100.0), duration=20.0)
    draws, text = RequestDraws.draw(w), list(range(200))
    slow, fast = draws.trace(w, 50.0, 128, 1.0, text), draws.trace(w, 100.0, 128, 1.0, text)
    assert (len(slow), len(fast)) == (1000, 2000)
    assert set(map(_fields, slow)) <= set(map(_fields, fast))  # the faster point adds requests to the slower one's
    arrivals = [r.arrival for r in fast]
    assert arrivals == sorted(arrivals) and 0 <= arrivals[0] and arrivals[-1] < 20.0
    assert all(8 <= len(r.prompt_token_ids) <= 64 and 8 <= r.max_tokens <= 32 for r in fast)
    gaps = np.diff(arrivals)
    assert abs(gaps.mean() * 100 - 1) < 0.05 and abs(gaps.std() / gaps.mean() - 1) < 0.1  # exponential gaps: CV 1
    skewed = [int(r.adapter_id.split("-")[1]) for r in draws.trace(w, 100.0, 128, 0.3, text)]
    assert 0 <= min(skewed) and max(skewed) < 128
    assert abs(np.mean(np.array(skewed) < 128 // 10) - 0.1 ** 0.3) < 0.03  # P(X < 0.1) = 0.1^alpha, about half


def test_quick_sweep_on_tiny_model_writes_json_report_and_plot(tiny_llama_dir, tmp_path):
    out_md, out_json = tmp_path / "bench.md", tmp_path / "workload.json"
    write_section(out_md, "engine", "engine figures")
    write_section(out_md, "server", "server figures")
    bench_workload.main(["--quick", "--device", "cpu", "--model", str(tiny_llama_dir), "--output", str(out_md), "--json", str(out_json)])

    res = json.loads(out_json.read_text())
    w = res["workload"]
    assert res["series"] == [[4, 1.0], [4, 0.3]] and w["rates"] == [4.0, 12.0]
    assert len(res["points"]) == len(res["series"]) * len(w["rates"]) * 2  # the tiny model never overloads PEFT
    for p in res["points"]:
        assert POINT_KEYS <= set(p) and (CACHE_KEYS <= set(p)) == (p["system"] == "lorax")
        assert p["num_requests"] > 0 and p["completed"] == p["num_requests"] == len(p["requests"])
        assert 0 <= p["ttft_p50"] <= p["ttft_p99"] <= p["latency_p99"] and 0 <= p["slo_attainment"] <= 1
    lorax = [p for p in res["points"] if p["system"] == "lorax"]
    # 4 adapters, 2 slots, a host cache of 3: adapters move host -> slot and disk -> host
    assert sum(p["slot_loads"] for p in lorax) > 0 and sum(p["disk_loads"] for p in lorax) > 0

    report = out_md.read_text()
    assert report.index("section:engine") < report.index("section:workload") < report.index("section:server")
    section = report[report.index("<!-- section:workload -->"):report.index("<!-- /section:workload -->")]
    assert "Quick smoke run" in section and "### n = 4 (uniform)" in section and "### n = 4, α = 0.3" in section
    assert "| R (req/s) | system |" in section and "| 12 | PEFT | " in section
    assert "scripts/bench_workload.py --quick" in section
    assert "![TTFT p99 vs arrival rate](img/workload_ttft_p99.png)" in section
    assert 'AsyncLLM(model, dtype="float32", device="cpu", max_loras=2,' in section

    res["points"] = [p for p in res["points"] if (p["system"], p["rate"]) != ("peft", 12.0)]  # as if PEFT had stopped
    assert "| 12 | PEFT | not run: past capacity at a lower rate |" in bench_workload.render(res)
    png = tmp_path / "img" / "workload_ttft_p99.png"
    assert png.read_bytes().startswith(b"\x89PNG") and res["plot_path"] == str(png)
