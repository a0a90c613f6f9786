import math

import pytest

from textgen.engine.params import RANGES, ParamError, SamplingParams


def test_defaults_are_the_old_services():
    p = SamplingParams()
    assert (p.max_new_tokens, p.temperature, p.top_p, p.repetition_penalty, p.no_repeat_ngram_size) == (
        200,
        0.7,
        0.9,
        1.2,
        2,
    )
    assert not p.greedy


@pytest.mark.parametrize("temperature,do_sample", [(0.0, True), (0.7, False)])
def test_greedy_when_temperature_zero_or_sampling_off(temperature, do_sample):
    assert SamplingParams(temperature=temperature, do_sample=do_sample).greedy


@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("temperature", -0.1, "temperature must be in [0, 5], got -0.1"),
        ("temperature", math.nan, "temperature must be a finite number in [0, 5], got nan"),
        ("top_p", 0.0, "top_p must be in (0, 1], got 0.0"),
        ("top_p", 1.5, "top_p must be in (0, 1]"),
        ("top_k", -1, "top_k must be in [0, 100000], got -1"),
        ("repetition_penalty", 0.0, "repetition_penalty must be in (0, 10]"),
        ("max_new_tokens", 0, "max_new_tokens must be in [1, 4096], got 0"),
        ("no_repeat_ngram_size", 21, "no_repeat_ngram_size must be in [0, 20]"),
        ("seed", -5, "seed must be in [0, "),
        ("temperature", "hot", "temperature must be a number in [0, 5], got 'hot'"),
        ("min_p", 1.5, "min_p must be in [0, 1], got 1.5"),
        ("min_tokens", -1, "min_tokens must be in [0, 4096], got -1"),
        ("presence_penalty", 2.5, "presence_penalty must be in [-2, 2], got 2.5"),
        ("frequency_penalty", -3, "frequency_penalty must be in [-2, 2], got -3"),
    ],
)
def test_out_of_range_names_field_and_range(field, value, expected):
    with pytest.raises(ParamError) as err:
        SamplingParams(**{field: value})
    assert err.value.field == field
    assert expected in err.value.message


def test_stop_strings_are_bounded():
    with pytest.raises(ParamError, match="at most 16"):
        SamplingParams(stop=tuple(str(i) for i in range(17)))
    with pytest.raises(ParamError, match="1 to 256 characters"):
        SamplingParams(stop=("",))
    assert SamplingParams(stop=("\n\n", "END")).stop == ("\n\n", "END")


def test_every_bounded_field_exists_on_sampling_params():
    assert set(RANGES) <= set(SamplingParams.__dataclass_fields__)


def test_min_tokens_fits_the_budget_and_errors_speak_the_callers_names():
    assert SamplingParams(min_tokens=5, max_new_tokens=5).min_tokens == 5
    assert (
        SamplingParams(min_tokens=500, max_new_tokens=None).min_tokens == 500
    )  # the server's budget decides
    with pytest.raises(ParamError) as err:
        SamplingParams(min_tokens=6, max_new_tokens=5)
    assert err.value.field == "min_tokens"
    renamed = err.value.renamed({"max_new_tokens": "max_completion_tokens"})
    assert renamed.field == "min_tokens"
    assert renamed.message == "min_tokens (6) must be at most max_completion_tokens (5)"
    budget = ParamError("max_new_tokens", "max_new_tokens must be in [1, 4096], got 0")
    assert budget.renamed({"max_new_tokens": "max_tokens"}).field == "max_tokens"
    # Whole names, once: "stop" is not the start of "stopped", and a new name is not renamed again.
    stop = ParamError(
        "stop", "each stop string must have 1 to 256 characters; stopped at max_completion_tokens"
    )
    names = {
        "stop": "stop_sequences",
        "max_completion_tokens": "max_tokens",
        "max_tokens": "max_output_tokens",
    }
    assert stop.renamed(names).message == (
        "each stop_sequences string must have 1 to 256 characters; stopped at max_tokens"
    )


def test_logit_bias_is_bounded_like_openais():
    assert SamplingParams(logit_bias=((50256, -100.0), (3, 100))).logit_bias[1] == (3, 100)
    with pytest.raises(ParamError) as err:
        SamplingParams(logit_bias=((7, 100.5),))
    assert err.value.field == "logit_bias"
    assert err.value.message == 'logit_bias["7"] must be in [-100, 100], got 100.5'
    with pytest.raises(ParamError, match="finite"):
        SamplingParams(logit_bias=((7, math.inf),))
    with pytest.raises(ParamError, match="at most 1024 tokens"):
        SamplingParams(logit_bias=tuple((i, 1.0) for i in range(1025)))
    with pytest.raises(ParamError, match="token ids"):
        SamplingParams(logit_bias=((-1, 1.0),))


def test_the_readmes_parameter_table_lists_every_generate_field():
    """The README's Parameters table is the /generate body's reference: every field, and no other."""
    import re
    from pathlib import Path

    from textgen.frontend.generate_protocol import GenerateRequest

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme.split("## Parameters", 1)[1].split("\n\n| field |", 1)[1].split("\n\n", 1)[0]
    documented = re.findall(r"^\| `(\w+)` \|", table, flags=re.M)
    assert sorted(documented) == sorted(GenerateRequest.model_fields)
