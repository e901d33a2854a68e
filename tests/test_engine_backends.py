"""The GPU path's backends, end to end on the tiny model, on the CPU: Triton kernels run in Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 without a GPU) and CUDA graphs are replaced by `CheckedEagerFactory`,
which runs the same capture/replay logic and refuses host reads of device values during capture.

Reference: the gather+SDPA attention and torch LoRA backends. In float32 every combination must give the same
greedy tokens, and seeded sampled tokens, for the base model and a mix of adapters, across prefill, chunked
prefill, prefix-cache hits and decode steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lora_helpers import AdapterSpec, make_peft_adapter
from transformers import AutoModelForCausalLM

from lorax_lite import LLM, SamplingParams
from lorax_lite.config import EngineConfig
from lorax_lite.engine.attention import SdpaBackend, select_attention_backend
from lorax_lite.engine.cuda_graphs import CheckedEagerFactory, HostSyncError, graph_batch_sizes
from lorax_lite.engine.staging import StepUploader

# small blocks and a small token budget: prompts cross blocks, long ones are prefilled in chunks
ENGINE = dict(dtype="float32", device="cpu", block_size=8, num_kv_blocks=96, max_num_batched_tokens=40,
              max_num_seqs=8, max_loras=3, max_lora_rank=8)
PROMPTS = [
    "The quick brown fox",
    "What is the capital of France? The capital of France is Paris. And the capital of Spain is",
    "Pricing: the price",
    "Hello",
    "You are a helpful assistant. Answer the question in one sentence, please. What is",
]
ADAPTERS = [None, "a1", "a2", None, "a1"]
SPECS = {"a1": AdapterSpec(rank=8, alpha=16, seed=11), "a2": AdapterSpec(rank=4, alpha=8, seed=12,
                                                                         target_modules=("q_proj", "v_proj", "up_proj"))}


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    root = tmp_path_factory.mktemp("backend-adapters")
    return {name: make_peft_adapter(model, root / name, spec) for name, spec in SPECS.items()}


def make_llm(model_dir: Path, adapter_dirs: dict[str, Path], **settings: object) -> LLM:
    llm = LLM(str(model_dir), **{**ENGINE, **settings})
    for name, path in adapter_dirs.items():
        llm.add_adapter(name, path)
    return llm


def generate(llm: LLM) -> list[list[int]]:
    params = [SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True)]
    jobs = [(p, sp, a) for p, a in zip(PROMPTS, ADAPTERS, strict=True) for sp in params]
    outs = llm.generate([p for p, _, _ in jobs], [sp for _, sp, _ in jobs], [a for _, _, a in jobs])
    assert all(o.finish_reason == "length" for o in outs), [o.error for o in outs]
    return [o.token_ids for o in outs]


@pytest.fixture(scope="module")
def reference(tiny_llama_dir: Path, adapter_dirs: dict[str, Path]) -> list[list[int]]:
    llm = make_llm(tiny_llama_dir, adapter_dirs, attention_backend="sdpa", lora_backend="segment")
    return generate(llm)


@pytest.mark.parametrize(
    ("attention", "lora"), [("triton", "segment"), ("sdpa", "triton"), ("triton", "triton")]
)
def test_triton_backends_give_the_reference_tokens(tiny_llama_dir, adapter_dirs, reference, attention, lora):
    llm = make_llm(tiny_llama_dir, adapter_dirs, attention_backend=attention, lora_backend=lora)
    assert llm.engine.attention_backend.name == attention
    assert generate(llm) == reference
    if attention == lora == "triton":  # again: the prompts' blocks now come from the prefix cache, read in place
        stats = llm.engine.scheduler.prefix_cache_stats
        hits = stats.num_hit_tokens
        assert generate(llm) == reference
        assert stats.num_hit_tokens > hits


def test_decode_graphs_replay_the_reference_tokens(tiny_llama_dir, adapter_dirs, reference):
    llm = make_llm(tiny_llama_dir, adapter_dirs, attention_backend="triton", lora_backend="triton")
    factory = CheckedEagerFactory()
    graphs = llm.engine.runner.enable_decode_graphs(factory, ENGINE["max_num_seqs"], llm.engine.max_seq_len)
    assert graphs.sizes == [1, 2, 4, 8] and factory.captures == 4
    assert generate(llm) == reference
    assert factory.replays > 0  # the decode steps replayed graphs; the prefill steps ran eagerly


def test_graph_buckets_pad_to_the_next_size():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(8) == [1, 2, 4, 8]
    assert graph_batch_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert graph_batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]


def test_a_forward_that_reads_device_values_on_the_host_cannot_be_captured():
    factory = CheckedEagerFactory()
    x = torch.arange(4)
    with pytest.raises(HostSyncError, match="_local_scalar_dense"):
        factory.capture(lambda: x * int(x.sum().item()))
    with pytest.raises(HostSyncError, match="nonzero"):
        factory.capture(lambda: x.nonzero())
    with pytest.raises(HostSyncError, match="tolist"):
        factory.capture(lambda: torch.tensor(x.tolist()))
    assert x.tolist() == [0, 1, 2, 3]  # refused only during a capture
    graph = factory.capture(lambda: x * 2)
    x += 1  # a replay reads the buffers' new values into the same output tensor
    output = graph.output
    graph.replay()
    assert graph.output is output and output.tolist() == [2, 4, 6, 8]


def test_the_sdpa_backend_is_not_captured(tiny_llama_dir, adapter_dirs):
    llm = make_llm(tiny_llama_dir, adapter_dirs, attention_backend="sdpa", lora_backend="triton")
    with pytest.raises(ValueError, match="cannot be captured"):
        llm.engine.runner.enable_decode_graphs(CheckedEagerFactory(), 4, 64)
    llm = make_llm(tiny_llama_dir, adapter_dirs, attention_backend="triton", lora_backend="segment")
    with pytest.raises(ValueError, match="lora_backend triton"):
        llm.engine.runner.enable_decode_graphs(CheckedEagerFactory(), 4, 64)


def test_backend_choice_and_refusals(monkeypatch: pytest.MonkeyPatch):
    cpu = torch.device("cpu")
    assert isinstance(select_attention_backend("auto", cpu), SdpaBackend)  # auto: Triton only on CUDA
    assert select_attention_backend("triton", cpu).name == "triton"  # the interpreter is on in the tests
    with pytest.raises(ValueError, match="block_size that is a power of two, got 12"):
        select_attention_backend("triton", cpu, block_size=12)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="attention_backend triton needs Triton: .*CUDA device.*TRITON_INTERPRET"):
        select_attention_backend("triton", cpu)
    for name, value in (("attention_backend", "flash"), ("lora_backend", "punica"), ("enforce_eager", "yes")):
        with pytest.raises(ValueError, match=name):
            EngineConfig(**{name: value})


def test_the_uploader_passes_host_tensors_through_on_the_cpu():
    uploader = StepUploader(torch.device("cpu"))
    tensors = {"a": torch.arange(6).view(2, 3), "b": torch.tensor([1, 2], dtype=torch.int32)}
    (out,) = uploader.upload(tensors)
    assert out["a"] is tensors["a"] and out["b"].dtype == torch.int64 and out["b"].tolist() == [1, 2]


@pytest.mark.cuda
def test_the_uploader_copies_once_into_views_of_the_same_shapes():
    uploader = StepUploader(torch.device("cuda"))
    tensors = {"a": torch.arange(6).view(2, 3), "b": torch.tensor([7, 8], dtype=torch.int32), "c": torch.tensor([])}
    (out,) = uploader.upload(tensors)
    assert out["a"].device.type == "cuda" and out["a"].shape == (2, 3) and out["a"].cpu().tolist() == [[0, 1, 2],
                                                                                                       [3, 4, 5]]
    assert out["b"].cpu().tolist() == [7, 8] and out["c"].numel() == 0


def test_info_reports_the_resolved_backends(tiny_llama_dir):
    from server_helpers import call

    from lorax_lite import AsyncLLM
    from lorax_lite.server import create_app

    llm = AsyncLLM(str(tiny_llama_dir), **{**ENGINE, "attention_backend": "triton"})
    try:
        info = call(create_app(llm, "tiny"), "GET", "/info").json()
        assert info["backends"] == {"device": "cpu", "dtype": "float32", "linear": llm.engine.linear_backend,
                                    "attention": "triton",
                                    "lora": llm.engine.lora_layers.backend.name, "cuda_graph_batch_sizes": []}
        assert info["backends"]["lora"] in ("grouped", "segment")  # auto on the CPU: torch's kernels
        assert info["engine_config"]["attention_backend"] == "triton" and info["engine_config"]["enforce_eager"] is False
    finally:
        llm.shutdown()


@pytest.mark.cuda
def test_on_a_gpu_replayed_graphs_give_the_reference_tokens(tiny_llama_dir, adapter_dirs):
    """The real thing: CudaGraphFactory's graphs, the Triton kernels compiled, fp32, against the torch backends."""
    reference = make_llm(tiny_llama_dir, adapter_dirs, device="cuda", attention_backend="sdpa",
                         lora_backend="segment", enforce_eager=True)
    fast = make_llm(tiny_llama_dir, adapter_dirs, device="cuda")
    assert fast.engine.backends()["attention"] == "triton" and fast.engine.backends()["lora"] == "triton"
    assert fast.engine.cuda_graph_sizes == [1, 2, 4, 8]
    assert generate(fast) == generate(reference)
