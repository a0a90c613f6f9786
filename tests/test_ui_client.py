"""ui/client.py on its own: SSE parsing, error translation, schema reading, against the real server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import httpx
import pytest

from tests.server import ROOT, free_port
from tests.test_ui_servers import FINAL, Reply, ScriptedServer, sse
from ui.client import (
    GenerationFailed,
    InvalidParameter,
    RequestTimedOut,
    SSEParser,
    ServerUnreachable,
    TextgenClient,
    UnexpectedReply,
    error_from_response,
    fallback_request_schema,
    normalize_url,
    start_command,
)

STREAM = sse({"text": "Caf"}, {"text": "é 東京 🙂"}, {"text": "!", **FINAL})


# -- SSE parsing -------------------------------------------------------------------------------------


def feed_all(parser: SSEParser, chunks: list[bytes]) -> list[dict]:
    return [event for chunk in chunks for event in parser.feed(chunk)] + parser.close()


def test_sse_whole_stream_at_once():
    events = SSEParser().feed(STREAM)
    assert [e["text"] for e in events] == ["Caf", "é 東京 🙂", "!"]
    assert events[-1]["finish_reason"] == "length"


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n", b"\r"])
def test_sse_events_split_across_chunks_at_every_byte(line_end):
    # Every split point, including inside the multi-byte characters and between CR and LF.
    stream = STREAM.replace(b"\n", line_end)
    expected = feed_all(SSEParser(), [stream])
    assert len(expected) == 3
    for cut in range(1, len(stream)):
        assert feed_all(SSEParser(), [stream[:cut], stream[cut:]]) == expected, cut
    assert feed_all(SSEParser(), [bytes([b]) for b in stream]) == expected


def test_sse_holds_an_unfinished_event_until_its_blank_line():
    parser = SSEParser()
    assert parser.feed(b'data: {"text": "a"}\n') == []
    assert parser.feed(b"\n") == [{"text": "a"}]
    assert parser.feed(b'data: {"text": "cut off"}\n') == [] and parser.close() == []


def test_sse_ignores_comments_and_other_fields_and_joins_data_lines():
    stream = b': keep-alive\n\nevent: delta\nid: 3\ndata: {"text":\ndata: "a"}\n\n'
    assert SSEParser().feed(stream) == [{"text": "a"}]


def test_sse_rejects_what_is_not_a_json_object():
    with pytest.raises(UnexpectedReply, match="not JSON"):
        SSEParser().feed(b"data: <html>\n\n")
    with pytest.raises(UnexpectedReply, match="not a JSON object"):
        SSEParser().feed(b"data: [1]\n\n")


# -- error translation -------------------------------------------------------------------------------


def response(status: int, body: bytes, path: str = "/generate") -> httpx.Response:
    return httpx.Response(status, content=body, request=httpx.Request("POST", f"http://h:1{path}"))


def test_validation_error_names_the_field_and_keeps_the_servers_range():
    body = {
        "error": "temperature: temperature must be in [0, 5], got 9.0",
        "detail": [{"loc": ["temperature"], "msg": "temperature must be in [0, 5], got 9.0", "type": "x"}],
    }
    err = error_from_response(response(400, json.dumps(body).encode()), "http://h:1")
    assert isinstance(err, InvalidParameter) and err.field == "temperature"
    assert err.message == (
        "The server rejected `temperature`: temperature must be in [0, 5], got 9.0. "
        "Change it and generate again."
    )


def test_server_failures_and_strangers_are_told_apart():
    failed = error_from_response(response(500, b'{"error": "generation failed: boom", "detail": []}'), "u")
    assert isinstance(failed, GenerationFailed) and "boom" in failed.message
    stranger = error_from_response(response(404, b"<html>nope</html>", "/generate_stream"), "http://h:1")
    assert isinstance(stranger, UnexpectedReply)
    assert "http://h:1/generate_stream answered HTTP 404" in stranger.message


def test_real_validation_errors_from_the_server(tiny_server):
    with TextgenClient(tiny_server.url) as client:
        with pytest.raises(InvalidParameter) as caught:
            client.generate({"prompt": "hi", "max_new_tokens": 2000})
        assert caught.value.field == "max_new_tokens"
        assert "[1, 1024] on this server (TEXTGEN_MAX_NEW_TOKENS)" in caught.value.message
        # The stream endpoint answers an invalid body with JSON, raised before any text.
        with pytest.raises(InvalidParameter) as caught:
            with client.stream({"prompt": "hi", "top_p": 0}):
                pass
        assert caught.value.field == "top_p" and "(0, 1]" in caught.value.message


def test_server_down_says_how_to_start_it():
    port = free_port()
    with TextgenClient(f"http://127.0.0.1:{port}") as client:
        assert client.health().state == "down"
        with pytest.raises(ServerUnreachable) as caught:
            client.generate({"prompt": "hi"})
    assert caught.value.command == f"bentoml serve service:TextGen --port {port}"
    assert f"Cannot reach the textgen server at http://127.0.0.1:{port}" in caught.value.message
    assert start_command("http://localhost:3000") == "bentoml serve service:TextGen"  # bentoml's default port


def test_a_server_that_never_answers_times_out():
    with socket.socket() as listener:  # accepts connections (the kernel's backlog) and never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with TextgenClient(url, timeout=0.5) as client:
            assert client.health().state == "loading"
            with pytest.raises(RequestTimedOut, match="did not answer within 0.5 s"):
                client.generate({"prompt": "hi"})


def test_error_in_the_middle_of_a_stream_keeps_the_text_so_far():
    routes = {"/generate_stream": Reply(content_type="text/event-stream", chunks=[
        sse({"text": "Hello"}), sse({"text": " wor"}), sse({"error": "the engine crashed"})
    ])}  # fmt: skip
    with ScriptedServer(routes) as server, TextgenClient(server.url) as client:
        with client.stream({"prompt": "hi"}) as generation:
            deltas = []
            with pytest.raises(GenerationFailed, match="after 9 characters: the engine crashed"):
                for delta in generation:
                    deltas.append(delta)
    assert deltas == ["Hello", " wor"] and generation.text == "Hello wor" and generation.completion is None


def test_stream_that_ends_without_its_final_event_is_an_error():
    routes = {"/generate_stream": Reply(content_type="text/event-stream", chunks=[sse({"text": "Hel"})])}
    with ScriptedServer(routes) as server, TextgenClient(server.url) as client:
        with client.stream({"prompt": "hi"}) as generation:
            with pytest.raises(GenerationFailed, match="stream ended before the generation finished"):
                list(generation)


def test_urls_as_people_type_them():
    assert normalize_url(" localhost:3000/ ") == "http://localhost:3000"
    assert normalize_url("https://gpu.example:8443") == "https://gpu.example:8443"
    with pytest.raises(ServerUnreachable, match="not a server URL"):
        normalize_url("ftp://x")


# -- against the real server -------------------------------------------------------------------------


def test_stream_deltas_and_final_event_from_the_real_server(tiny_server):
    body = {"prompt": "What is AI?", "max_new_tokens": 9, "seed": 5, "ignore_eos": True, "postprocess": False}
    with TextgenClient(tiny_server.url) as client:
        assert client.health().state == "ready"
        with client.stream(body) as generation:
            deltas = list(generation)
        plain = client.generate(body)
    completion = generation.completion
    assert completion is not None and "".join(deltas) == completion.text == plain.text
    assert completion.seed == 5 and completion.usage["completion_tokens"] == 9
    assert completion.finish_reason == "length" and completion.model == "tiny-gpt2"
    assert set(completion.timings) == {"queue_ms", "first_token_ms", "total_ms", "tokens_per_second"}


def test_built_in_schema_matches_the_server(tiny_server):
    """The fallback the UI shows while the server is down must agree with the server.

    When this fails after a server change, refresh ui/fallback_request_schema.json from the server's
    /docs.json: paths./generate.post.requestBody.content.application/json.schema.
    """
    with TextgenClient(tiny_server.url) as client:
        live = client.request_schema()
    built_in = fallback_request_schema()
    assert live.params == built_in.params
    assert live.templates == ("auto", "none", "assistant", "few_shot", "chat")
    assert live.params["top_p"].allowed == "(0, 1]" and live.params["max_new_tokens"].default == 200


def test_the_models_sampling_defaults_become_the_schemas_defaults(tiny_server):
    with TextgenClient(tiny_server.url) as client:
        assert client.sampling_defaults() == {}  # GPT-2's generation config has none
    info = {
        "sampling_defaults": {"mode": "auto", "source": "x", "values": {"temperature": 0.05, "top_p": 0.9}}
    }
    routes = {"/info": Reply(chunks=[json.dumps(info).encode()])}
    with ScriptedServer(routes) as server, TextgenClient(server.url) as client:
        model = client.sampling_defaults()
    assert model == {"temperature": 0.05, "top_p": 0.9}
    schema = fallback_request_schema()
    # Values of the wrong type for their field, and fields the schema lacks, are left out.
    odd = {"top_k": 2.5, "do_sample": 1, "repetition_penalty": True, "no_such_field": 3}
    patched = schema.with_defaults({**model, **odd})
    assert patched.params["temperature"].default == 0.05 and patched.params["top_p"].default == 0.9
    for name in ("top_k", "do_sample", "repetition_penalty"):
        assert patched.params[name] == schema.params[name]
    assert schema.params["temperature"].default == 0.7  # the original is untouched
    # An older server's /info, without sampling_defaults: the route's defaults are what it uses.
    with ScriptedServer({"/info": Reply(chunks=[b'{"model": "old"}'])}) as server, TextgenClient(
        server.url
    ) as c:
        assert c.sampling_defaults() == {}


def test_the_ui_never_imports_the_model_stack():
    code = (
        "import sys, ui.client, ui.controls, ui.history; "
        "print(sorted({'textgen', 'torch', 'transformers'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
