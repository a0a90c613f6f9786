"""The Streamlit app (ui/app.py) driven by AppTest against the real `bentoml serve` of the tiny GPT-2.

A recording proxy sits between the app and the server, so each test sees the exact body that reached
the server and the exact events that came back, and compares them with what the page shows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from streamlit.testing.v1 import AppTest

from tests.server import ROOT, Server, free_port
from tests.test_ui_servers import FINAL, RecordingProxy, Reply, ScriptedServer, sse
from ui import controls
from ui.client import FALLBACK_SCHEMA_PATH, fallback_request_schema
from ui.history import export_json

APP = ROOT / "ui" / "app.py"
SCHEMA = fallback_request_schema()


@pytest.fixture(scope="module")
def proxy(tiny_server: Server) -> Iterator[RecordingProxy]:
    with RecordingProxy(tiny_server.url) as proxy:
        yield proxy


def open_app(monkeypatch: pytest.MonkeyPatch, url: str) -> AppTest:
    monkeypatch.setenv("TEXTGEN_URL", url)
    app = AppTest.from_file(str(APP), default_timeout=60)
    app.run()
    assert not app.exception
    return app


def badge(app: AppTest) -> str:
    return next(m.value for m in app.sidebar.markdown if "-badge[" in m.value)


def click_generate(app: AppTest, prompt: str) -> AppTest:
    param(app, "text_area", "Prompt").input(prompt)
    app.button(key="generate").click().run()
    assert not app.exception, app.exception  # a failure is a message on the page, never a traceback
    return app


def param(app: AppTest, kind: str, label: str):  # type: ignore[no-untyped-def]
    """A widget by its label: parameter widgets are labelled with the API's field names."""
    (widget,) = [w for w in getattr(app, kind) if w.label == label]
    return widget


def test_generate_sends_every_parameter_and_shows_the_streamed_text(monkeypatch, proxy):
    app = open_app(monkeypatch, proxy.url)
    assert "Server ready" in badge(app)
    assert param(app, "selectbox", "template").options == ["auto", "none", "assistant", "few_shot", "chat"]
    assert param(app, "slider", "temperature").value == 0.7  # the server's default

    param(app, "selectbox", "template").select("assistant")
    param(app, "number_input", "max_new_tokens").set_value(12)
    param(app, "slider", "temperature").set_value(0.9)
    param(app, "slider", "top_p").set_value(0.8)
    param(app, "number_input", "top_k").set_value(20)
    param(app, "slider", "repetition_penalty").set_value(1.1)
    param(app, "slider", "no_repeat_ngram_size").set_value(3)
    param(app, "number_input", "seed").set_value(42)
    param(app, "text_area", "stop").input("zzzz\nqq\\tq")
    param(app, "toggle", "ignore_eos").set_value(True)
    assert param(app, "selectbox", "speculative").value == "server default"
    param(app, "selectbox", "speculative").select("on")
    param(app, "number_input", "max_words").set_value(0).run()  # before postprocess=False disables it
    param(app, "toggle", "postprocess").set_value(False)
    click_generate(app, "Question: what is the weather like today?")

    exchange = proxy.posts()[-1]
    assert exchange.path == "/generate_stream" and exchange.status == 200
    assert exchange.body == {
        "prompt": "Question: what is the weather like today?",
        "max_new_tokens": 12,
        "temperature": 0.9,
        "top_p": 0.8,
        "top_k": 20,
        "repetition_penalty": 1.1,
        "no_repeat_ngram_size": 3,
        "do_sample": True,
        "ignore_eos": True,
        "truncate": None,  # a new field the UI has no widget for yet: sent as the server's default
        "min_p": 0.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "min_tokens": 0,
        "logprobs": None,
        "seed": 42,
        "stop": ["zzzz", "qq\tq"],
        "stop_token_ids": [],
        "include_stop_str_in_output": False,
        "skip_special_tokens": True,
        "allowed_token_ids": None,  # an empty list box: unset, not an empty list (which would allow nothing)
        "bad_words": [],
        "speculative": True,
        "template": "assistant",
        "postprocess": False,
        "strip_prompt": True,
        "drop_repeated_lines": True,
        "max_words": 0,
        "trim_incomplete_sentence": False,
    }
    events = exchange.sse_events()
    final = events[-1]
    # The server honoured them: its seed, 12 tokens to the end (ignore_eos), a templated prompt.
    assert final["seed"] == 42 and final["usage"]["completion_tokens"] == 12
    assert final["finish_reason"] == "length" and final["usage"]["prompt_tokens"] > 20

    text = "".join(e["text"] for e in events)
    assert text and app.markdown[0].value == text  # the streamed text, as it arrived
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Finish reason"] == "length" and metrics["Completion tokens"] == "12"
    assert metrics["Prompt tokens"] == str(final["usage"]["prompt_tokens"])
    assert metrics["Time to first token"] == f"{final['timings']['first_token_ms']:.0f} ms"
    assert metrics["Tokens/s"] == f"{final['timings']['tokens_per_second']:.1f}"
    assert any("Model **tiny-gpt2** · seed 42" in c.value for c in app.caption)

    (entry,) = app.session_state["history"]
    assert entry.outcome == "completed" and entry.output == text and entry.parameters["seed"] == 42
    exported = json.loads(export_json(app.session_state["history"]))
    assert exported[0]["prompt"] == exchange.body["prompt"] and exported[0]["usage"] == final["usage"]
    assert app.expander[0].label.startswith("#1 · completed · Question: what is the weather")

    # Reuse brings the prompt and parameters back after they were changed.
    param(app, "slider", "temperature").set_value(2.0).run()
    app.button(key="history.reuse.1").click().run()
    assert param(app, "slider", "temperature").value == 0.9 and param(app, "number_input", "seed").value == 42


def test_unstreamed_generation_is_post_processed(monkeypatch, proxy):
    app = open_app(monkeypatch, proxy.url)
    app.toggle(key="ui.stream").set_value(False)
    param(app, "number_input", "max_new_tokens").set_value(30)
    param(app, "number_input", "max_words").set_value(2)
    param(app, "toggle", "ignore_eos").set_value(True)
    click_generate(app, "What is AI?")
    exchange = proxy.posts()[-1]
    assert exchange.path == "/generate" and exchange.body["max_words"] == 2
    reply = json.loads(exchange.response)
    assert app.markdown[0].value == reply["generated_text"] and len(reply["generated_text"].split()) <= 2
    assert {m.label: m.value for m in app.metric}["Completion tokens"] == "30"


def test_presets_set_several_knobs_at_once(monkeypatch, tiny_server):
    app = open_app(monkeypatch, tiny_server.url)
    app.segmented_control(key="ui.preset").set_value("precise").run()
    knobs = {name: param(app, kind, name).value for kind, name in KNOBS}
    assert knobs == {
        "temperature": 0.2,
        "top_p": 0.8,
        "top_k": 20,
        "repetition_penalty": 1.3,
        "do_sample": True,
    }
    assert app.segmented_control(key="ui.preset").value is None  # an action, not a mode
    app.segmented_control(key="ui.preset").set_value("balanced").run()
    defaults = {name: SCHEMA.params[name].default for _, name in KNOBS}
    assert {name: param(app, kind, name).value for kind, name in KNOBS} == defaults


KNOBS = [
    ("slider", "temperature"),
    ("slider", "top_p"),
    ("number_input", "top_k"),
    ("slider", "repetition_penalty"),
    ("toggle", "do_sample"),
]


def scripted_textgen(model_defaults: dict) -> dict[str, Reply]:
    """A textgen server whose model has its own sampling defaults (GET /info), as the offline default has."""
    body_schema = json.loads(FALLBACK_SCHEMA_PATH.read_text())
    openapi = {
        "paths": {
            "/generate": {"post": {"requestBody": {"content": {"application/json": {"schema": body_schema}}}}}
        }
    }
    info = {"sampling_defaults": {"mode": "auto", "source": "a preset", "values": model_defaults}}
    return {
        "/readyz": Reply(chunks=[b'{"status": "ready"}']),
        "/docs.json": Reply(chunks=[json.dumps(openapi).encode()]),
        "/info": Reply(chunks=[json.dumps(info).encode()]),
        "/generate_stream": Reply(
            content_type="text/event-stream", chunks=[sse({"text": "Paris.", **FINAL})]
        ),
    }


def test_default_settings_send_the_models_own_sampling_defaults(monkeypatch):
    """The page sends every field it has a widget for, so its widgets start at what the server uses for a
    field left out: the model's own defaults (GET /info), not the route's temperature 0.7 (issue #13)."""
    model = {"temperature": 0.05, "top_p": 0.9}
    with ScriptedServer(scripted_textgen(model)) as server, RecordingProxy(server.url) as proxy:
        app = open_app(monkeypatch, proxy.url)
        assert param(app, "slider", "temperature").value == 0.05
        assert param(app, "slider", "top_p").value == 0.9
        assert param(app, "selectbox", "template").value == "auto"
        assert any("the model's own: temperature 0.05, top_p 0.9" in c.value for c in app.sidebar.caption)
        click_generate(app, "What is the capital of France?")
        body = proxy.posts()[-1].body
        editable = {n: p.default for n, p in SCHEMA.params.items() if controls.widget_kind(p) is not None}
        assert body == {"prompt": "What is the capital of France?", **editable, **model}
        assert app.markdown[0].value == "Paris."

        # "Balanced" is the server's defaults, so the model's too.
        param(app, "slider", "temperature").set_value(1.5).run()
        app.segmented_control(key="ui.preset").set_value("balanced").run()
        assert param(app, "slider", "temperature").value == 0.05


def test_untouched_settings_follow_the_server_once_it_is_ready(monkeypatch):
    """Opened while the server loads, the page shows the built-in defaults; once the server is ready, every
    value nobody changed takes the server's default (the model's own), and what the user set stays."""
    routes = scripted_textgen({"temperature": 0.05, "top_p": 0.5, "repetition_penalty": 1.0})
    routes["/readyz"] = Reply(503, chunks=[b'{"status": "loading"}'])
    with ScriptedServer(routes) as server:
        app = open_app(monkeypatch, server.url)
        assert "Server loading" in badge(app)
        assert param(app, "slider", "temperature").value == 0.7 and param(app, "slider", "top_p").value == 0.9
        param(app, "number_input", "top_k").set_value(20).run()
        param(app, "slider", "repetition_penalty").set_value(1.5).run()
        routes["/readyz"] = Reply(chunks=[b'{"status": "ready"}'])
        app.run()
        assert "Server ready" in badge(app)
        assert param(app, "slider", "temperature").value == 0.05  # followed
        assert param(app, "slider", "top_p").value == 0.5  # followed
        assert param(app, "number_input", "top_k").value == 20  # the user's
        assert param(app, "slider", "repetition_penalty").value == 1.5  # the user's, though the model has one
        assert app.session_state["form.values"]["temperature"] == 0.05


def test_server_down_shows_the_command_that_starts_it(monkeypatch):
    port = free_port()
    app = open_app(monkeypatch, f"http://127.0.0.1:{port}")
    assert "Server down" in badge(app)
    assert "Cannot reach the textgen server" in app.error[0].value
    assert app.code[0].value == f"bentoml serve service:TextGen --port {port}"
    assert any("Built-in defaults" in c.value for c in app.sidebar.caption)
    assert param(app, "number_input", "max_new_tokens").value == 200  # the built-in schema still works

    click_generate(app, "What is AI?")
    assert len(app.error) == 1 and "Cannot reach" in app.error[0].value
    assert app.session_state["history"] == []


def test_validation_error_names_the_field_and_the_servers_range(monkeypatch, tiny_server):
    app = open_app(monkeypatch, tiny_server.url)
    # Within every widget's range, but too long for the tiny model's 256-token context: only the server knows.
    param(app, "number_input", "max_new_tokens").set_value(200)
    click_generate(app, "The quick brown fox jumps over the lazy dog. " * 12)
    (error,) = app.error
    assert error.value.startswith("The server rejected `max_new_tokens`: the prompt is ")
    assert "more than the model's context of 256" in error.value
    assert app.session_state["history"] == []  # nothing was generated


def test_error_in_the_middle_of_a_stream_keeps_the_text_so_far(monkeypatch):
    routes = {
        "/readyz": Reply(chunks=[b"ok"]),
        "/generate_stream": Reply(
            content_type="text/event-stream",
            chunks=[sse({"text": "Hello"}), sse({"text": " wor"}), sse({"error": "out of memory"})],
        ),
    }
    with ScriptedServer(routes) as server:
        app = open_app(monkeypatch, server.url)
        click_generate(app, "What is AI?")
    assert app.markdown[0].value == "Hello wor"
    assert "failed on the server after 9 characters: out of memory" in app.error[0].value
    assert app.session_state["history"][0].outcome == "failed"


def test_timeout_is_reported(monkeypatch):
    routes = {"/readyz": Reply(chunks=[b"ok"]), "/generate_stream": Reply(hang=3)}
    with ScriptedServer(routes) as server:
        app = open_app(monkeypatch, server.url)
        app.number_input(key="ui.timeout").set_value(1)
        click_generate(app, "What is AI?")
    assert "did not answer within 1 s" in app.error[0].value


# -- the widgets' conversions ------------------------------------------------------------------------


def test_stop_strings_round_trip_through_the_text_box():
    stop = SCHEMA.params["stop"]
    values = ["\n\n", "User:", "a\\b", "\t"]
    assert controls.to_widget(stop, values) == "\\n\\n\nUser:\na\\\\b\n\\t"
    assert controls.from_widget(stop, controls.to_widget(stop, values)) == values


def test_token_ids_are_typed_one_per_line_and_sent_as_integers():
    ids = SCHEMA.params["stop_token_ids"]
    assert ids.item_type == "integer" and controls.widget_kind(ids) == "lines"
    assert controls.to_widget(ids, [510, 7]) == "510\n7"
    # anything but an integer goes out as typed, for the server's 400 to name the field
    assert controls.from_widget(ids, "510\n 7 \n\nseven") == [510, 7, "seven"]


def test_widgets_respect_the_schemas_bounds():
    top_p = SCHEMA.params["top_p"]
    assert controls.numeric_bounds(top_p) == (0.01, 1.0, 0.01)  # (0, 1]: zero itself is not allowed
    assert controls.to_widget(top_p, 0) == 0.01 and controls.to_widget(top_p, 7) == 1.0
    assert controls.numeric_bounds(SCHEMA.params["seed"])[1] == 2**53 - 1  # what a browser can hold
    kinds = {name: controls.widget_kind(p) for name, p in SCHEMA.params.items()}
    assert kinds["max_new_tokens"] == "number" and kinds["temperature"] == "slider"
    assert kinds["template"] == "select" and kinds["stop"] == "lines" and kinds["max_words"] == "number"
    assert kinds["logit_bias"] is None  # an object: no widget, so the server's default (none) applies
    # A nullable boolean: "server default" sends null, never a toggle's false.
    speculative = SCHEMA.params["speculative"]
    assert kinds["speculative"] == "choice3" and speculative.default is None
    for value, label in ((None, "server default"), (True, "on"), (False, "off")):
        assert controls.to_widget(speculative, value) == label
        assert controls.from_widget(speculative, label) is value
    assert controls.to_widget(speculative, 1) == "server default"  # not a boolean: back to the default
    form = controls.Form({}, SCHEMA)
    editable = {name: p.default for name, p in SCHEMA.params.items() if kinds[name] is not None}
    assert form.body() == {"prompt": "", **editable}
    form.set({"top_p": 0, "template": "chat", "prompt": "hi", "unknown": 1})
    assert (
        form.body()["top_p"] == 0.01 and form.body()["template"] == "chat" and form.body()["prompt"] == "hi"
    )
