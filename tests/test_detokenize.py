import pytest
from transformers import AutoTokenizer

from textgen.engine.detokenize import IncrementalDetokenizer, StopMatcher

TEXTS = ["emoji 🙂🚀 and CJK 東京 你好", "Café naïve — déjà vu", "plain ascii text."]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_never_split_a_character_and_add_up(tokenizer, text):
    prompt = tokenizer.encode("Say:")
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # the byte-level tokenizer really splits characters
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.push(t) for t in ids]
    deltas.append(detok.flush())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_a_character_split_across_tokens_waits_for_its_last_byte(tokenizer):
    ids = tokenizer.encode("🙂")
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tokenizer, [])
    assert [detok.push(t) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.push(ids[-1]) == "🙂"


def test_stop_string_spanning_deltas_is_found_and_never_emitted():
    m = StopMatcher(("END",))
    out = []
    for delta in ["Hello E", "N", "D and more"]:
        text, stopped = m.feed(delta)
        out.append(text)
        if stopped:
            break
    assert "".join(out) == "Hello "
    assert stopped


def test_a_prefix_that_does_not_complete_is_released():
    m = StopMatcher(("END",))
    assert m.feed("The EN") == ("The ", False)
    assert m.feed("VOY") == ("ENVOY", False)
    assert m.feed(" E") == (" ", False)
    assert m.flush() == "E"


def test_earliest_of_several_stop_strings_wins():
    m = StopMatcher(("\n\n", "Q:"))
    assert m.matched is None
    assert m.feed("A: yes\nQ: next\n\n") == ("A: yes\n", True)
    assert m.matched == "Q:"  # named: Anthropic's stop_sequence


def test_no_stop_strings_emit_everything():
    m = StopMatcher(())
    assert m.feed("anything") == ("anything", False)
