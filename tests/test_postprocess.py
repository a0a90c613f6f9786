from textgen.frontend.postprocess import (
    PostProcessing,
    drop_repeated_lines,
    limit_words,
    strip_echoed_prompt,
    trim_incomplete_sentence,
)


def test_drop_repeated_lines_keeps_first_occurrence_and_ignores_case_and_spacing():
    text = "AI is great.\nIt learns.\nai  is great.\n\nIt learns.\nNew line."
    assert drop_repeated_lines(text) == "AI is great.\nIt learns.\n\nNew line."


def test_drop_repeated_lines_handles_unicode_and_empty():
    assert drop_repeated_lines("東京 🙂\n東京 🙂\nCafé") == "東京 🙂\nCafé"
    assert drop_repeated_lines("") == ""
    assert drop_repeated_lines("\n\n") == ""


def test_strip_echoed_prompt_only_at_the_start():
    assert strip_echoed_prompt("What is AI? AI is a field.", "What is AI?") == " AI is a field."
    assert strip_echoed_prompt("  What is AI?\nIt is...", " What is AI? ") == "\nIt is..."
    assert strip_echoed_prompt("It asks: What is AI?", "What is AI?") == "It asks: What is AI?"
    assert strip_echoed_prompt("What is AI?", "What is AI?") == ""


def test_limit_words_keeps_spacing_and_unicode():
    assert limit_words("one  two\nthree four", 3) == "one  two\nthree"
    assert limit_words("naïve café 東京 🙂", 2) == "naïve café"
    assert limit_words("short", 200) == "short"
    assert limit_words("", 5) == ""
    assert limit_words("a b", 0) == ""


def test_trim_incomplete_sentence():
    assert trim_incomplete_sentence("It works. It is fast! And then") == "It works. It is fast!"
    assert trim_incomplete_sentence('He said "yes." Then the') == 'He said "yes."'
    assert trim_incomplete_sentence("no sentence end here") == "no sentence end here"
    assert trim_incomplete_sentence("Version 1.5 is out. Next") == "Version 1.5 is out."
    assert trim_incomplete_sentence("") == ""


def test_pipeline_order_and_switches():
    text = "What is AI? AI is smart.\nAI is smart.\nIt learns from data and"
    on = PostProcessing(trim_incomplete_sentence=True)
    assert on.apply(text, "What is AI?") == "AI is smart."
    off = PostProcessing(strip_prompt=False, drop_repeated_lines=False, max_words=None)
    assert off.apply(text, "What is AI?") == text
    assert PostProcessing(max_words=4).apply(text, "What is AI?") == "AI is smart.\nIt"


def test_empty_result_is_empty_not_an_error():
    assert PostProcessing(trim_incomplete_sentence=True).apply("", "prompt") == ""
    assert PostProcessing().apply("prompt", "prompt") == ""
