"""Shared fixtures: tiny random models saved as HF directories (and one as a GGUF file), with a real tokenizer.

No model hub is reachable, so the tokenizer is built in code: byte-level BPE trained on a fixed
corpus (every byte is in the alphabet, so any text round-trips), ChatML special tokens and a
ChatML chat template. `<|im_end|>` is the eos token, as in the default model.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

# Every engine in the tests (and the servers they start) checks its allocators' invariants whenever it goes idle.
os.environ.setdefault("LORAX_DEBUG_INVARIANTS", "1")
# Without a GPU, Triton kernels (lorax_lite/kernels/) run in Triton's CPU interpreter. Triton reads the variable when
# a kernel is defined, i.e. when lorax_lite.kernels' modules are first imported, which the tests do lazily.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` are skipped, with the reason, on a machine without a CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False); run `pytest -m cuda` on one")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_VOCAB_SIZE = 320
_CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "The quick brown fox jumps over the lazy dog. Hello, world! 0123456789",
    "Pricing: the price of the product is set by the supply chain and the demand.",
    "You are a helpful assistant. Answer the question in one sentence, please.",
] * 4
TINY_MODEL_SIZES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.1,  # peaked logits: greedy comparisons do not hinge on near-ties
)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of exactly TINY_VOCAB_SIZE tokens, eos `<|im_end|>`, ChatML template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    assert tokenizer.get_vocab_size() == TINY_VOCAB_SIZE
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def save_tiny_model(config: PreTrainedConfig, out: Path) -> Path:
    """Save a randomly initialised (seed 0) model for `config`, plus the tiny tokenizer, to `out`."""
    tokenizer = build_tiny_tokenizer()
    config.vocab_size = len(tokenizer)
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = None
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HF directory of a tiny random Llama (tied embeddings, like SmolLM2) with the tiny tokenizer."""
    config = LlamaConfig(**TINY_MODEL_SIZES, tie_word_embeddings=True)
    return save_tiny_model(config, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HF directory of a tiny random Qwen2 (attention biases, untied head) with the tiny tokenizer."""
    config = Qwen2Config(**TINY_MODEL_SIZES, tie_word_embeddings=False)
    return save_tiny_model(config, tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def tiny_llama_gguf(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama written as an F32 GGUF file (llama arch, gpt2 tokenizer, chat template), alone in its directory."""
    return write_llama_gguf(tiny_llama_dir, tmp_path_factory.mktemp("tiny-gguf") / "tiny-llama.F32.gguf")


_GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
_GGUF_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                   "lm_head.weight": "output.weight"}


def write_llama_gguf(model_dir: Path, out: Path) -> Path:
    """Write the Llama in `model_dir` as llama.cpp would (q/k rows permuted, tied head left out), in F32."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    writer = gguf.GGUFWriter(str(out), "llama")
    _add_llama_metadata(writer, model.config)
    _add_tokenizer_metadata(writer, tokenizer)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        writer.add_tensor(_gguf_tensor_name(name), _llama_cpp_layout(name, tensor, model.config))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _add_llama_metadata(writer: gguf.GGUFWriter, config: LlamaConfig) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)


def _add_tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerFast) -> None:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = [token for token, _ in sorted(spec["model"]["vocab"].items(), key=lambda item: item[1])]
    special = {added["content"] for added in spec["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)


def _gguf_tensor_name(name: str) -> str:
    if name in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[name]
    _, _, index, rest = name.split(".", 3)  # model.layers.{i}.{module}.weight
    return f"blk.{index}.{_GGUF_LAYER_NAMES[rest.removesuffix('.weight')]}.weight"


def _llama_cpp_layout(name: str, tensor: torch.Tensor, config: LlamaConfig) -> np.ndarray:
    # llama.cpp interleaves the two rotary halves of each q/k head; transformers undoes it on load.
    weights = tensor.detach().numpy()
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    for module, num_heads in heads.items():
        if module in name:
            shape = weights.shape
            weights = weights.reshape(num_heads, 2, shape[0] // num_heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    return np.ascontiguousarray(weights)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The real default model fetched by `lorax-lite fetch-model` (`make test` fetches it first).

    Skipped when absent, except under `make test` / CI (LORAX_REQUIRE_DEFAULT_MODEL=1), where a
    missing model is a failure, not a silent skip.
    """

    from lorax_lite.config import DEFAULT_MODEL_DIR

    path = Path(os.environ.get("LORAX_MODEL", DEFAULT_MODEL_DIR))
    if not (path / "config.json").exists():
        if os.environ.get("LORAX_REQUIRE_DEFAULT_MODEL") == "1":
            pytest.fail(f"default model missing at {path}: run `lorax-lite fetch-model`")
        pytest.skip(f"default model not fetched ({path}); run `lorax-lite fetch-model`")
    return path


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server on a free loopback port for the session (see tests/redis_server.py)."""
    from redis_server import redis_server_or_skip

    with redis_server_or_skip() as server:
        yield server.url


@pytest.fixture(params=["sqlite", "redis"])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of a fresh, empty registry: a new SQLite file, or a new key prefix on the test Redis."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    return f"{request.getfixturevalue('redis_url')}?prefix=test-{uuid.uuid4().hex[:12]}"
