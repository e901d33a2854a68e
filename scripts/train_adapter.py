"""LoRA fine-tuning (PEFT) of a chat model on a JSONL of conversations; writes a servable adapter directory.

Each line of --data is `{"messages": [{"role": ..., "content": ...}, ...]}` with at least one
assistant turn. Conversations are rendered with the tokenizer's chat template and tokenized as the
engine tokenizes prompts; the loss covers only the assistant turns, each up to and including its end
token (`<|im_end|>`), so the model learns to stop. AdamW, linear warmup then linear decay, fp32,
right-padded batches shuffled with a seeded generator: the same seed gives the same weights.

--out gets adapter_config.json, adapter_model.safetensors and a model card README.md, nothing else
(other files already there, such as a unit's data/ and lorax.json, are left alone). With
--eval HELDOUT.jsonl (lines `{"question", "key_fact"}`) the saved adapter is loaded into the
lorax-lite engine and asked every question greedily, with the training data's system prompt;
accuracy (answers containing the key fact, scored as scripts/eval_adapters.py scores) goes into the card.

    .venv/bin/python scripts/train_adapter.py --data adapters/pricing/data/train.jsonl \\
        --out adapters/pricing --eval adapters/pricing/data/heldout.jsonl

Exit code 2 with a message for bad input (missing file, malformed line, no assistant turn, no chat template).
"""

from __future__ import annotations

import argparse
import datetime
import math
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from eval_adapters import (DataError, Message, ask, contains_key_fact, load_heldout, question_conversation, read_jsonl,
                           resolve_path)
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "models/SmolLM2-135M-Instruct"
LLAMA_PROJECTIONS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
IGNORE_INDEX = -100  # label of a token outside the loss
WARMUP_FRACTION = 0.1
MAX_GRAD_NORM = 1.0
SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class TrainConfig:
    """The hyper-parameters; they go into the model card as they are."""

    rank: int = 16
    alpha: float = 32
    target_modules: tuple[str, ...] = tuple(LLAMA_PROJECTIONS.split(","))
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 8
    seed: int = 0
    max_length: int = 256

    def __post_init__(self) -> None:
        for name in ("rank", "epochs", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not (self.alpha > 0 and self.lr > 0):
            raise ValueError(f"--alpha and --lr must be > 0, got {self.alpha} and {self.lr}")
        if not self.target_modules or not all(self.target_modules):
            raise ValueError(f"--target-modules must be a comma-separated list of module names, got {self.target_modules}")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # the token itself inside an assistant turn, IGNORE_INDEX elsewhere

    @property
    def num_loss_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


# ---- data -------------------------------------------------------------------------------------

def load_conversations(path: Path) -> list[list[Message]]:
    """The conversations of a JSONL file; a line without a usable assistant turn is a DataError naming it."""
    conversations = []
    for line_no, obj in read_jsonl(path):
        messages = obj.get("messages")
        if not isinstance(messages, list) or not messages or not all(map(_is_message, messages)):
            raise DataError(f"{path} line {line_no}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}")
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            raise DataError(f"{path} line {line_no}: the conversation has no assistant turn to learn from")
        conversations.append(messages)
    return conversations


def _is_message(m: object) -> bool:
    return isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)


def check_chat_template(tokenizer: PreTrainedTokenizerBase, model: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"the tokenizer of {model} has no chat template; train on a chat (instruct) model")


def render_ids(tokenizer: PreTrainedTokenizerBase, messages: list[Message], add_generation_prompt: bool) -> list[int]:
    """Token ids of the chat template's text, tokenized without extra special tokens, as the engine does."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False).input_ids


def assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: list[Message], full: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each assistant turn in `full`: from after the generation prompt through the end token.

    The turn starts where the conversation before it, rendered with the generation prompt, ends; it
    ends after the first eos token (e.g. `<|im_end|>`) of the conversation rendered through it.
    """
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_token_prefix(tokenizer, messages[:i], full, True, i))
        through = _token_prefix(tokenizer, messages[: i + 1], full, False, i)
        ends = [j + 1 for j in range(start, len(through)) if through[j] == tokenizer.eos_token_id]
        spans.append((start, ends[0] if ends else len(through)))
    return spans


def _token_prefix(tokenizer: PreTrainedTokenizerBase, messages: list[Message], full: list[int],
                  add_generation_prompt: bool, turn: int) -> list[int]:
    ids = render_ids(tokenizer, messages, add_generation_prompt)
    if full[: len(ids)] != ids:
        raise DataError(f"the chat template's rendering up to message {turn} is not a token prefix of the whole "
                        "conversation, so the assistant tokens cannot be located; this template is not supported")
    return ids


def encode_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[Message], max_length: int) -> Example:
    """Token ids and labels (assistant tokens only), truncated to `max_length` tokens."""
    full = render_ids(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE_INDEX] * len(full)
    for start, end in assistant_spans(tokenizer, messages, full):
        labels[start:end] = full[start:end]
    return Example(full[:max_length], labels[:max_length])


def encode_all(tokenizer: PreTrainedTokenizerBase, conversations: list[list[Message]], max_length: int) -> list[Example]:
    examples = [encode_conversation(tokenizer, c, max_length) for c in conversations]
    num_truncated = sum(len(render_ids(tokenizer, c, False)) > max_length for c in conversations)
    if num_truncated:
        print(f"warning: {num_truncated} of {len(conversations)} conversations are longer than --max-length "
              f"{max_length} tokens and were truncated", file=sys.stderr)
    kept = [e for e in examples if e.num_loss_tokens]
    if not kept:
        raise DataError(f"no assistant tokens within the first {max_length} tokens of any conversation; raise --max-length")
    if len(kept) < len(examples):
        print(f"warning: {len(examples) - len(kept)} conversations have no assistant token within --max-length "
              f"{max_length} and are left out", file=sys.stderr)
    return kept


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels, each [B, longest]."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ---- training ---------------------------------------------------------------------------------

def add_lora(model: PreTrainedModel, config: TrainConfig, base_name: str) -> PreTrainedModel:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=list(config.target_modules),
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    peft_model.peft_config["default"].base_model_name_or_path = base_name  # as given, not this machine's path
    return peft_model


def linear_schedule(optimizer: torch.optim.Optimizer, num_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, round(WARMUP_FRACTION * num_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, (num_steps - step) / max(1, num_steps - warmup)))


def train(model: PreTrainedModel, examples: list[Example], config: TrainConfig, pad_id: int, device: str) -> list[float]:
    """Train the LoRA parameters in place; returns the mean loss of each epoch."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    scheduler = linear_schedule(optimizer, steps_per_epoch * config.epochs)
    order = torch.Generator().manual_seed(config.seed)
    epoch_losses = []
    model.train()
    with tqdm(total=steps_per_epoch * config.epochs, desc="train", unit="step") as bar:
        for epoch in range(config.epochs):
            perm = torch.randperm(len(examples), generator=order).tolist()
            losses = []
            for first in range(0, len(perm), config.batch_size):
                batch = collate([examples[i] for i in perm[first: first + config.batch_size]], pad_id)
                loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}")
                bar.update()
            epoch_losses.append(sum(losses) / len(losses))
    model.eval()
    return epoch_losses


def save_adapter(model: PreTrainedModel, out: Path, dtype: torch.dtype) -> None:
    """adapter_config.json + adapter_model.safetensors (LoRA weights in `dtype`) in `out`; never a pickled .bin."""
    for param in model.parameters():
        if param.requires_grad:  # the LoRA factors; training is over
            param.data = param.data.to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    stale = out / "adapter_model.bin"
    if stale.exists():
        print(f"removing stale {stale}", file=sys.stderr)
        stale.unlink()
    model.save_pretrained(out, safe_serialization=True)
    if not (out / "adapter_model.safetensors").is_file() or stale.exists():
        raise RuntimeError(f"PEFT did not write {out / 'adapter_model.safetensors'} alone")


# ---- evaluation and model card ----------------------------------------------------------------

@dataclass
class EvalResult:
    path: str
    num_correct: int
    n: int

    @property
    def accuracy(self) -> float:
        return self.num_correct / self.n


def evaluate_adapter(model: str, out: Path, heldout_path: Path, system_prompt: str | None, rank: int,
                     device: str) -> EvalResult:
    """Greedy answers from the saved adapter through the lorax-lite engine, as it will be served."""
    from lorax_lite import LLM

    items = load_heldout(heldout_path)
    llm = LLM(model, dtype="float32", device=device, max_lora_rank=max(16, rank))
    llm.add_adapter("trained", out)
    answers = ask(llm, [question_conversation(system_prompt, item.question) for item in items], ["trained"] * len(items))
    num_correct = 0
    for item, answer in zip(items, answers):
        is_correct = contains_key_fact(answer, item.key_fact)
        num_correct += is_correct
        if not is_correct:
            print(f"miss: {item.question!r} -> {' '.join(answer.split())!r} (key fact {item.key_fact!r})", file=sys.stderr)
    return EvalResult(str(heldout_path), num_correct, len(items))


def system_prompt_of(conversations: list[list[Message]]) -> str | None:
    first = conversations[0]
    return first[0]["content"] if first[0]["role"] == "system" else None


def model_card(out: Path, args: argparse.Namespace, argv: Sequence[str], config: TrainConfig, examples: list[Example],
               epoch_losses: list[float], seconds: float, device: str, result: EvalResult | None) -> str:
    num_tokens = sum(len(e.input_ids) for e in examples)
    rows = [
        ("base model", f"`{args.model}`"),
        ("data", f"`{args.data}` ({len(examples)} conversations, {num_tokens} tokens, "
                 f"{sum(e.num_loss_tokens for e in examples)} assistant tokens in the loss)"),
        ("LoRA", f"rank {config.rank}, alpha {config.alpha:g}, dropout 0, bias none, "
                 f"targets {', '.join(config.target_modules)}"),
        ("training", f"{config.epochs} epoch{'s' * (config.epochs != 1)}, lr {config.lr:g} "
                     f"(AdamW, {WARMUP_FRACTION:.0%} linear warmup, linear decay), batch size {config.batch_size}, "
                     f"seed {config.seed}, max length {config.max_length}; trained in fp32, saved in {args.save_dtype}"),
        ("training time", f"{seconds:.0f} s on {device}"),
        ("final loss", f"{epoch_losses[-1]:.4f} (mean over the last epoch; per epoch: "
                       f"{', '.join(f'{x:.3f}' for x in epoch_losses)})"),
    ]
    if result:
        rows.append(("held-out accuracy", f"{result.accuracy:.2f} ({result.num_correct}/{result.n}, `{result.path}`, "
                                          "greedy via the lorax-lite engine, answer contains the key fact)"))
    command = shlex.join([".venv/bin/python", "scripts/train_adapter.py", *argv])
    return "\n".join([
        f"# LoRA adapter `{out.resolve().name}`", "",
        f"Trained by `scripts/train_adapter.py` on {datetime.date.today().isoformat()}. lorax-lite serves it from",
        "`adapter_config.json` and `adapter_model.safetensors`.", "",
        "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), "",
        f"Command: `{command}`", "",
    ])


# ---- main -------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="training conversations (JSONL of {'messages': [...]})")
    p.add_argument("--out", required=True, help="adapter directory to write")
    p.add_argument("--model", default=DEFAULT_MODEL, help="base model directory (default %(default)s)")
    p.add_argument("--rank", type=int, default=defaults.rank, help="LoRA rank (default %(default)s)")
    p.add_argument("--alpha", type=float, default=defaults.alpha, help="LoRA alpha (default %(default)s)")
    p.add_argument("--target-modules", default=LLAMA_PROJECTIONS,
                   help="comma-separated module names (default: all seven projections)")
    p.add_argument("--epochs", type=int, default=defaults.epochs, help="passes over the data (default %(default)s)")
    p.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="conversations per step (default %(default)s)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="LoRA init and shuffling seed (default %(default)s)")
    p.add_argument("--max-length", type=int, default=defaults.max_length, help="tokens per conversation (default %(default)s)")
    p.add_argument("--save-dtype", default="float32", choices=tuple(SAVE_DTYPES),
                   help="dtype of the saved weights; float16 halves the file (default %(default)s)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default %(default)s")
    p.add_argument("--eval", metavar="HELDOUT.jsonl", help="after training, score the adapter on these held-out questions")
    p.add_argument("--system-prompt", help="system prompt for --eval questions (default: the training data's first one)")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    targets = tuple(t.strip() for t in args.target_modules.split(","))
    return TrainConfig(args.rank, args.alpha, targets, args.epochs, args.lr, args.batch_size, args.seed, args.max_length)


def prepare(args: argparse.Namespace) -> tuple[TrainConfig, list[list[Message]], PreTrainedTokenizerBase, list[Example]]:
    """Check every input before any training starts; bad input raises DataError, ValueError or OSError."""
    config = config_from_args(args)
    conversations = load_conversations(Path(args.data))
    if args.eval and not Path(args.eval).is_file():
        raise DataError(f"{args.eval}: no such file")
    if not resolve_path(args.model).is_dir():
        raise DataError(f"{args.model}: no such model directory")
    tokenizer = AutoTokenizer.from_pretrained(resolve_path(args.model))
    check_chat_template(tokenizer, args.model)
    return config, conversations, tokenizer, encode_all(tokenizer, conversations, config.max_length)


def build_model(args: argparse.Namespace, config: TrainConfig, device: str) -> PreTrainedModel:
    """The base model in fp32 on `device` with fresh LoRA layers (seeded); an unknown target module is a DataError."""
    torch.manual_seed(config.seed)  # LoRA A's initialisation
    base = AutoModelForCausalLM.from_pretrained(resolve_path(args.model), dtype=torch.float32).to(device)
    base.config.use_cache = False
    names = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
    missing = [t for t in config.target_modules if t not in names]
    if missing:
        raise DataError(f"--target-modules: {', '.join(missing)} not in {args.model}")
    return add_lora(base, config, args.model)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    start = time.perf_counter()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        config, conversations, tokenizer, examples = prepare(args)
        model = build_model(args, config, device)
    except (DataError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    epoch_losses = train(model, examples, config, pad_id, device)
    out = Path(args.out)
    save_adapter(model, out, SAVE_DTYPES[args.save_dtype])
    seconds = time.perf_counter() - start  # checking, loading, training and saving
    print(f"trained {len(examples)} conversations x {config.epochs} epochs in {seconds:.1f} s on {device}; "
          f"final loss {epoch_losses[-1]:.4f}; adapter in {out}")
    result = None
    if args.eval:
        system_prompt = args.system_prompt if args.system_prompt is not None else system_prompt_of(conversations)
        result = evaluate_adapter(str(resolve_path(args.model)), out, Path(args.eval), system_prompt, config.rank, device)
        print(f"held-out accuracy {result.accuracy:.2f} ({result.num_correct}/{result.n})")
    (out / "README.md").write_text(model_card(out, args, argv, config, examples, epoch_losses, seconds, device, result))
    print(f"total time {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
