"""IncrementalDetokenizer on a byte-level BPE built in code: split characters, stop strings, hold-back."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lorax_lite.engine.detokenizer import IncrementalDetokenizer

CORPUS = ["héllo wörld 世界 🙂 hello world, the cat sat on the mat."] * 20
TEXTS = [
    " hello world 世界🙂 héllo",
    "🙂🙂 世界世界 wörld",
    " the cat sat 🚀 on the mat. 日本語 ok",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2-style byte-level BPE with a vocab small enough that emoji and CJK split across tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def make(tokenizer, stop: list[str] | None = None, prompt: str = "hi") -> IncrementalDetokenizer:
    return IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt), stop or [])


def feed(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    """Append ids one by one; return the stream_text seen after each."""
    streamed = []
    for token_id in ids:
        detok.append(token_id)
        streamed.append(detok.stream_text(finished=False))
    return streamed


def test_tokenizer_really_splits_characters(tokenizer):
    ids = tokenizer.encode("🙂 世界 🚀")
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


@pytest.mark.parametrize("text", TEXTS)
def test_stream_is_prefix_of_final_and_never_broken(tokenizer, text):
    ids = tokenizer.encode(text) + [tokenizer.eos_token_id]
    detok = make(tokenizer)
    streamed = feed(detok, ids)
    final = detok.stream_text(finished=True)
    assert final == detok.output_text == tokenizer.decode(ids, skip_special_tokens=True)
    for chunk in streamed:
        assert "\ufffd" not in chunk and final.startswith(chunk)
    assert not detok.stopped


def test_special_tokens_inside_output_are_skipped(tokenizer):
    eos = tokenizer.eos_token_id
    ids = tokenizer.encode(" hello") + [eos] + tokenizer.encode(" 世界🙂") + [eos]
    detok = make(tokenizer)
    feed(detok, ids)
    assert detok.output_text == " hello 世界🙂" == tokenizer.decode(ids, skip_special_tokens=True)


def test_keeps_special_tokens_when_asked(tokenizer):
    ids = tokenizer.encode(" hello") + [tokenizer.eos_token_id]
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("hi"), [], skip_special_tokens=False)
    feed(detok, ids)
    assert detok.output_text == " hello<eos>"


def test_stop_string_is_cut_and_sets_stopped(tokenizer):
    detok = make(tokenizer, stop=["world"])
    feed(detok, tokenizer.encode(" hello world 世界"))
    assert detok.stopped
    assert detok.output_text == " hello "
    assert detok.stream_text(finished=True) == " hello "


def test_stop_string_spanning_tokens(tokenizer):
    ids = tokenizer.encode(" hello world")
    pieces = [tokenizer.decode([i]) for i in ids]
    assert not any("o w" in p for p in pieces)  # the stop string below needs two tokens
    detok = make(tokenizer, stop=["o w"])
    streamed = feed(detok, ids)
    assert detok.stopped and detok.output_text == " hell"
    assert all(" hell".startswith(s) for s in streamed)


def test_stop_string_inside_split_character(tokenizer):
    detok = make(tokenizer, stop=["界🙂"])
    feed(detok, tokenizer.encode(" 世界🙂 after"))
    assert detok.stopped and detok.output_text == " 世"


def test_earliest_stop_string_wins_and_later_tokens_are_ignored(tokenizer):
    detok = make(tokenizer, stop=["mat", "cat"])
    ids = tokenizer.encode(" the cat sat on the mat")
    feed(detok, ids)
    assert detok.output_text == " the "
    detok.append(ids[0])
    assert detok.output_text == " the "


def test_stream_text_holds_back_possible_stop_prefix(tokenizer):
    detok = make(tokenizer, stop=["xyz!"])
    feed(detok, tokenizer.encode(" hello world"))
    assert not detok.stopped
    assert detok.output_text == " hello world"
    assert detok.stream_text(finished=False) == " hello wo"  # 3 = len("xyz!") - 1 held back
    assert detok.stream_text(finished=True) == " hello world"


def test_no_hold_back_without_stop_strings(tokenizer):
    detok = make(tokenizer)
    feed(detok, tokenizer.encode(" hello"))
    assert detok.stream_text(finished=False) == " hello"


def test_prompt_context_and_empty_prompt(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], [])
    ids = tokenizer.encode("世界 ok")
    feed(detok, ids)
    assert detok.output_text == "世界 ok"
