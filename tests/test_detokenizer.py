import random

import pytest

from pdserve.engine.detokenizer import IncrementalDetokenizer, step_all

TEXTS = [
    "Hello, world! This is a plain ASCII sentence.",
    "Café crème brûlée, naïve façade, Ærøskøbing, Straße.",
    "日本語のテキストと中文文本，还有한국어 문장。",
    "Emoji: 🎉👍🏽👨‍👩‍👧‍👦 🇫🇷 and 🤖 done.",
    "  leading spaces,\ttabs\nnewlines\n\n and   runs of   spaces ",
    "def f(x):\n    return x ** 2  # code\n",
]


def stream(tokenizer, prompt_ids, output_ids, **kwargs):
    """Run the detokenizer over output_ids; return (deltas, flush text, detokenizer)."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, **kwargs)
    deltas = []
    for token_id in output_ids:
        deltas.append(detok.step(token_id))
        if detok.stopped:
            break
    return deltas, detok.flush(), detok


def mixed_text(seed, n_pieces=60):
    rng = random.Random(seed)
    words = " ".join(TEXTS).split(" ")
    return "".join(rng.choice(words) + rng.choice([" ", "", "\n", "、", "🔥"]) for _ in range(n_pieces))


@pytest.mark.parametrize("seed", range(5))
def test_deltas_concatenate_to_full_decode(tokenizer, seed):
    prompt = tokenizer.encode("Translate this: ")
    output = tokenizer.encode(mixed_text(seed))
    deltas, rest, detok = stream(tokenizer, prompt, output)
    expected = tokenizer.decode(output, skip_special_tokens=True)
    assert "".join(deltas) + rest == detok.text == expected
    assert rest == ""  # nothing is held back when the text ends on a complete character


@pytest.mark.parametrize("text", TEXTS)
def test_multibyte_characters_are_never_split(tokenizer, text):
    output = tokenizer.encode(text)
    deltas, rest, detok = stream(tokenizer, [], output)
    assert detok.text == text
    assert not any("\ufffd" in d for d in deltas + [rest])
    assert "".join(deltas) == text


def test_emoji_split_over_several_tokens_is_held_until_complete(tokenizer):
    output = tokenizer.encode("a🎉")
    assert len(output) > 2  # byte-level BPE spreads the emoji over several tokens
    deltas, _, _ = stream(tokenizer, [], output)
    assert deltas[0] == "a"
    assert deltas[1:-1] == [""] * (len(output) - 2)
    assert deltas[-1] == "🎉"


def test_special_tokens_skipped_or_kept(tokenizer):
    eos = tokenizer.eos_token_id
    output = tokenizer.encode("Done.") + [eos]
    deltas, rest, detok = stream(tokenizer, [], output)
    assert detok.text == "Done."
    deltas, rest, detok = stream(tokenizer, [], output, skip_special_tokens=False)
    assert "".join(deltas) + rest == detok.text == "Done." + tokenizer.eos_token


def ids_of(tokenizer, pieces):
    """Token ids whose decoded pieces are exactly `pieces` (checked)."""
    ids = [i for p in pieces for i in tokenizer.encode(p)]
    assert [tokenizer.decode([i]) for i in ids] == pieces
    return ids


def test_stop_string_spanning_two_tokens(tokenizer):
    output = ids_of(tokenizer, ["Hello", " world", " EN", "D", " more", " text"])
    deltas, rest, detok = stream(tokenizer, [], output, stop=["END"])
    assert detok.stopped
    assert detok.text == "Hello world "
    assert "".join(deltas) + rest == "Hello world "
    assert not any("EN" in d for d in deltas)  # the first half was never emitted
    assert len(deltas) == 4  # stopped at the token completing the stop string


def test_stop_string_at_the_very_start(tokenizer):
    output = ids_of(tokenizer, ["###", " answer"])
    deltas, rest, detok = stream(tokenizer, [], output, stop=["###"])
    assert detok.stopped and detok.text == "" and deltas == [""] and rest == ""


def test_stop_string_in_the_middle_of_a_token(tokenizer):
    output = ids_of(tokenizer, ["The", " answer", " is", " forty", "-", "two"])
    deltas, rest, detok = stream(tokenizer, [], output, stop=["swe", "zzz"])
    assert detok.stopped
    assert "".join(deltas) + rest == detok.text == "The an"


def test_earliest_of_several_stop_strings_wins(tokenizer):
    output = ids_of(tokenizer, ["one", " two", " three", " four"])
    deltas, rest, detok = stream(tokenizer, [], output, stop=["four", "two"])
    assert "".join(deltas) + rest == detok.text == "one "


def test_text_without_stop_string_streams_intact(tokenizer):
    text = mixed_text(11)
    output = tokenizer.encode(text)
    deltas, rest, detok = stream(tokenizer, [], output, stop=["<never>", "qqqqq"])
    assert not detok.stopped
    assert "".join(deltas) + rest == detok.text == text


def test_flush_returns_text_held_back_for_stop_strings(tokenizer):
    output = ids_of(tokenizer, ["Hello", " world"])
    detok = IncrementalDetokenizer(tokenizer, [], stop=["STOP!"])
    emitted = "".join(detok.step(i) for i in output)
    assert emitted == "Hello w"  # last len("STOP!") - 1 = 4 characters held back
    assert detok.text == "Hello world"
    assert detok.flush() == "orld"
    assert detok.flush() == ""  # nothing twice


def test_flush_after_stop_returns_nothing(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], stop=["lo"])
    for i in ids_of(tokenizer, ["Hello", " world"]):
        detok.step(i)
    assert detok.stopped and detok.text == "Hel" and detok.flush() == ""


def test_stepping_many_at_once_gives_what_stepping_each_gives(tokenizer):
    """The node detokenizes a whole step's tokens in one batched decode: the deltas equal
    the one-by-one detokenizer's, request by request."""
    prompts = [tokenizer.encode(t) for t in TEXTS]
    outputs = [tokenizer.encode(mixed_text(seed, 30)) for seed in range(len(TEXTS))]
    one = [IncrementalDetokenizer(tokenizer, p) for p in prompts]
    many = [IncrementalDetokenizer(tokenizer, p) for p in prompts]
    for step in range(max(map(len, outputs))):
        rows = [i for i, out in enumerate(outputs) if step < len(out)]
        deltas = step_all([many[i] for i in rows], [outputs[i][step] for i in rows])
        assert deltas == [one[i].step(outputs[i][step]) for i in rows]
    assert [d.flush() for d in many] == [d.flush() for d in one]
    assert [d.text for d in many] == [d.text for d in one]
