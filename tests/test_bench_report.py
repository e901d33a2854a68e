"""scripts/bench_report.py: the report's sections per script and device, names, the recorded command, options."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "scripts"))

from bench_report import (  # noqa: E402
    DEFAULT_MODEL,
    TITLE,
    command_line,
    device_suffix,
    figure_name,
    parse_bench_args,
    section_name,
    write_section,
)


def test_sections_keep_each_other_and_sort_cpu_then_cuda_in_script_order(tmp_path: Path):
    report = tmp_path / "benchmarks.md"
    for script, device in [("server", "cuda"), ("lora", "cpu"), ("notes", "cpu"), ("engine", "cuda:1"), ("engine", "cpu")]:
        write_section(report, section_name(script, torch.device(device)), f"{script} on {device}")
    write_section(report, "lora", "lora on cpu, again")  # rewrites its own section only
    text = report.read_text()
    assert text.startswith(TITLE)
    order = [line.split(":")[1].rstrip(" ->") for line in text.splitlines() if line.startswith("<!-- section:")]
    assert order == ["engine", "lora", "notes", "engine-cuda", "server-cuda"]
    assert "lora on cpu, again" in text and "lora on cpu\n" not in text
    assert "engine on cuda:1" in text and "server on cuda" in text and text.count("<!-- /section:") == 5


@pytest.mark.parametrize(("device", "section", "figure"), [
    ("cpu", "workload", "workload_ttft_p99.png"),
    ("cuda", "workload-cuda", "workload_ttft_p99_cuda.png"),
    ("cuda:1", "workload-cuda", "workload_ttft_p99_cuda.png"),
])
def test_section_and_figure_names_carry_the_device(device: str, section: str, figure: str):
    assert section_name("workload", torch.device(device)) == section
    assert device_suffix(torch.device(device)) == ("" if device == "cpu" else "_cuda")  # the JSON name's suffix too
    assert figure_name("workload_ttft_p99.png", torch.device(device)) == figure


def test_command_line_names_make_bench_or_quotes_the_exact_command():
    assert command_line("bench_lora.py", ["--model", DEFAULT_MODEL]) == "`make bench`"
    got = command_line("bench_lora.py", ["--model", "my models/x", "--quick"])
    assert got == "`.venv/bin/python scripts/bench_lora.py --model 'my models/x' --quick`"


def test_default_outputs_follow_quick_and_device():
    args = parse_bench_args("test", "benchmarks_lora", ["--device", "cpu"])
    assert (args.device, args.output, args.json) == (torch.device("cpu"), "docs/benchmarks.md", "docs/benchmarks_lora.json")
    quick = parse_bench_args("test", "benchmarks_lora", ["--quick", "--device", "cpu", "--json", "x.json"])
    assert (quick.output, quick.json) == ("bench_results/quick.md", "x.json")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_bench_args("test", "benchmarks_lora", ["--device", "cuda"])
    assert exit_info.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err
