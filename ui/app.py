"""textgen's web UI: `streamlit run ui/app.py`.

A client of the served HTTP API (TEXTGEN_URL, default http://localhost:3000), never of the model itself,
so it runs anywhere the server is reachable and shows exactly what API users get.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# `streamlit run ui/app.py` runs this file as a script, not as part of the `ui` package.
ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import streamlit as st  # noqa: E402
from streamlit.delta_generator import DeltaGenerator  # noqa: E402
from streamlit.runtime.state import SessionStateProxy  # noqa: E402

from ui import controls  # noqa: E402
from ui.client import (  # noqa: E402
    URL_ENV,
    Generation,
    HealthReport,
    RequestSchema,
    TextgenClient,
    TextgenError,
    configured_url,
    fallback_request_schema,
)
from ui.history import Entry, export_json  # noqa: E402

BADGES = {
    "ready": ("ready", "green", ":material/check_circle:"),
    "loading": ("loading", "orange", ":material/hourglass_top:"),
    "down": ("down", "red", ":material/error:"),
}
DEFAULT_TIMEOUT_S = 120
SIDEBAR_WIDTH_PX = 360  # room for the presets on one line


@st.cache_data(ttl=60, show_spinner=False)
def server_schema(url: str) -> tuple[RequestSchema, dict[str, Any]]:
    """The server's request schema with the served model's own sampling defaults (GET /info) as the defaults
    of those fields, and those defaults; failures raise, so only a schema actually read is cached.

    Every request the page sends carries each field it has a widget for, so its widgets must start at what
    the server would use for a field left out (the model's temperature, say), not at the route's own default.
    """
    with TextgenClient(url) as client:
        schema = client.request_schema()
        model_defaults = client.sampling_defaults()
    return schema.with_defaults(model_defaults), model_defaults


def current_schema(client: TextgenClient | None, health: HealthReport) -> tuple[RequestSchema, str]:
    """The schema to build widgets from, and where it came from, in words."""
    if client is not None and health.state == "ready":
        try:
            schema, model_defaults = server_schema(client.url)
        except TextgenError as err:
            return fallback_request_schema(), f"Built-in defaults: {err.message}"
        if not model_defaults:
            return schema, "Defaults and ranges from the server."
        shown = ", ".join(f"{name} {value}" for name, value in model_defaults.items())
        return schema, f"Defaults and ranges from the server; the model's own: {shown}."
    return fallback_request_schema(), "Built-in defaults, until the server is ready."


def history() -> list[Entry]:
    return st.session_state.setdefault("history", [])


def show_error(message: str, command: str | None = None) -> None:
    st.error(message, icon=":material/error:")
    if command is not None:
        st.code(command, language="bash")


def show_health(health: HealthReport) -> None:
    label, color, icon = BADGES[health.state]
    st.badge(f"Server {label}", color=color, icon=icon)
    if health.error is not None and health.state == "loading":
        st.caption(health.error.message)


def sidebar(state: SessionStateProxy) -> tuple[TextgenClient | None, HealthReport]:
    # Widgets declare their current value as default: see controls.Form for why.
    st.header("Server")
    url = st.text_input(
        "URL",
        value=state.get("ui.url") or configured_url(),
        key="ui.url",
        help=f"Where `bentoml serve service:TextGen` listens; default: ${URL_ENV}.",
    )
    timeout = st.number_input(
        "Timeout (s)",
        min_value=1,
        max_value=3600,
        value=state.get("ui.timeout", DEFAULT_TIMEOUT_S),
        step=10,
        key="ui.timeout",
        help="Longest wait for the server: to answer, and between two streamed pieces of text.",
    )
    try:
        client: TextgenClient | None = TextgenClient(url, timeout=float(timeout))
        health = client.health()
    except TextgenError as err:  # an unusable URL
        client, health = None, HealthReport("down", err)
    show_health(health)
    return client, health


def parameters(state: SessionStateProxy, form: controls.Form, source: str) -> bool:
    """The parameter widgets; returns whether to stream."""
    st.header("Parameters")
    st.caption(source)
    st.segmented_control(
        "Preset",
        list(controls.PRESETS),
        key="ui.preset",
        format_func=str.capitalize,
        on_change=lambda: apply_preset(state, form),
        help=f"Sets {', '.join(controls.PRESET_FIELDS)} at once; balanced is the server's defaults "
        "(the model's own where it has them).",
    )
    form.render_sections()
    st.subheader("Output")
    stream = st.toggle(
        "Stream",
        value=state.get("ui.stream", True),
        key="ui.stream",
        help="Show the text as it is generated (/generate_stream).",
    )
    if stream and form.values.get("postprocess"):
        st.caption(
            "Streaming shows the model's text as generated: stop strings apply, post-processing does not. "
            "Turn streaming off for the post-processed text (/generate)."
        )
    return stream


def apply_preset(state: SessionStateProxy, form: controls.Form) -> None:
    name = state["ui.preset"]
    if name is not None:
        form.set(controls.preset_values(name, form.schema))
        state["ui.preset"] = None  # a one-shot action: the knobs may be changed right after


def generate(
    client: TextgenClient,
    body: dict[str, Any],
    stream: bool,
    output: DeltaGenerator,
    stop_slot: DeltaGenerator,
) -> Entry:
    """Run one generation into `output`, recording it in the history."""
    entry = Entry.for_request(body, "/generate_stream" if stream else "/generate")
    # Recorded first: Stop, or any other click, reruns the script and interrupts this run anywhere below.
    history().append(entry)
    if stream:
        generation = client.stream(body)
        stop_slot.button("Stop", key="stop", icon=":material/stop_circle:")
        try:
            with generation:
                with output:
                    st.write_stream(keep_current(entry, generation))
            assert generation.completion is not None  # the iteration ends only on the final event
            entry.complete(generation.completion)
        except TextgenError as err:
            entry.fail(err, generation.text)
        finally:
            if entry.outcome == "running":  # interrupted: leaving `with generation` cancelled the request
                entry.stop(generation.text)
        stop_slot.empty()
    else:
        try:
            with output, st.spinner("Generating…"):
                entry.complete(client.generate(body))
            output.markdown(entry.output)
        except TextgenError as err:
            entry.fail(err, "")
    if entry.outcome == "failed" and not entry.output:
        history().remove(entry)  # nothing was generated: an error to show, not a generation to keep
    return entry


def keep_current(entry: Entry, generation: Generation) -> Iterator[str]:
    """The deltas, keeping `entry.output` current: the run after a Stop may show the entry meanwhile."""
    for delta in generation:
        entry.output = generation.text
        yield delta


def settle_interrupted(entries: list[Entry]) -> None:
    """Mark the generations of stopped runs as stopped.

    With fast reruns, Streamlit starts the next run in a new thread while the stopped one is still
    waiting for its next token; that thread closes the connection (the server then cancels) only once
    the token arrives. This run must not show its generation as still running meanwhile.
    """
    for entry in entries:
        if entry.outcome == "running":
            entry.stop(entry.output)


def show_outcome(entry: Entry) -> None:
    if entry.outcome == "stopped":
        st.info(f"Stopped after {len(entry.output)} characters; the server drops the rest of the request.")
    elif entry.outcome == "failed":
        show_error(entry.error or "", entry.error_command)
    elif entry.outcome == "completed":
        if not entry.output:
            st.caption(
                f"No text: the model ended at once (finish reason {entry.finish_reason}). An instruction "
                "model answers a question with a template such as chat; a plain one continues text."
            )
        first_token = entry.timings.get("first_token_ms", 0.0)
        columns = st.columns(5)
        columns[0].metric("Finish reason", entry.finish_reason)
        columns[1].metric("Prompt tokens", entry.usage.get("prompt_tokens"))
        columns[2].metric("Completion tokens", entry.usage.get("completion_tokens"))
        columns[3].metric("Time to first token", f"{first_token:.0f} ms")
        columns[4].metric("Tokens/s", f"{entry.timings.get('tokens_per_second', 0.0):.1f}")
        total_s = entry.timings.get("total_ms", 0.0) / 1000
        st.caption(f"Model **{entry.model}** · seed {entry.seed} · {total_s:.2f} s in all · {entry.endpoint}")


def show_history(form: controls.Form) -> None:
    entries = history()
    st.subheader(f"History ({len(entries)})")
    if not entries:
        st.caption("This session's generations appear here, with their parameters.")
        return
    left, right, _ = st.columns([2, 1, 3])
    left.download_button(
        "Download JSON",
        export_json(entries),
        file_name="textgen-history.json",
        mime="application/json",
        on_click="ignore",
        icon=":material/download:",
    )
    right.button("Clear", key="history.clear", on_click=entries.clear)
    for number, entry in reversed(list(enumerate(entries, 1))):
        with st.expander(f"#{number} · {entry.outcome} · {entry.prompt[:80]}"):
            st.caption("Prompt")
            st.code(entry.prompt, language=None, wrap_lines=True)
            st.caption("Output")
            st.code(entry.output or "(no text)", language=None, wrap_lines=True)
            st.caption(f"Parameters ({entry.endpoint})")
            st.code(json.dumps(entry.parameters, indent=2, ensure_ascii=False), language="json")
            st.button(
                "Reuse prompt and parameters",
                key=f"history.reuse.{number}",
                on_click=lambda e=entry: form.set(e.reusable()),
            )


def main() -> None:
    st.set_page_config(
        page_title="textgen",
        page_icon=":material/edit_note:",
        layout="wide",
        initial_sidebar_state=SIDEBAR_WIDTH_PX,
    )
    state = st.session_state
    with st.sidebar:
        client, health = sidebar(state)
    schema, source = current_schema(client, health)
    form = controls.Form(state, schema)
    settle_interrupted(history())  # no generation of this run has started yet
    try:
        with st.sidebar:
            stream = parameters(state, form, source)

        st.title("textgen")
        if "template" in schema.params:
            form.render(schema.params["template"])
        form.render_prompt("Prompt", height=140, placeholder="What is AI?")
        generate_column, stop_column, _ = st.columns([1, 1, 6])
        clicked = generate_column.button("Generate", type="primary", key="generate", width="stretch")
        stop_slot = stop_column.empty()
        output = st.container()

        if clicked and client is not None:
            entry = generate(client, form.body(), stream, output, stop_slot)
            show_outcome(entry)
        else:
            if health.state == "down" and health.error is not None:
                show_error(health.error.message, health.error.command)
            elif health.state == "loading":
                st.info("The server is starting; Generate works once the badge says ready.")
            if history():
                output.markdown(history()[-1].output)
                show_outcome(history()[-1])
        st.divider()
        show_history(form)
    finally:
        if client is not None:
            client.close()


main()
