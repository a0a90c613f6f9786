"""The parameter widgets, built from the server's request schema, and the request body they make.

The widgets come from the schema (type, default, bounds, choices) rather than from a list kept here, so
the UI offers exactly what the server accepts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping
from typing import Any, Literal

import streamlit as st

from ui.client import Param, RequestSchema

WidgetKind = Literal["toggle", "choice3", "slider", "number", "select", "lines"]

# Streamlit's number inputs go through JavaScript numbers; larger integers lose precision there.
JS_MAX_SAFE_INT = 2**53 - 1
FLOAT_STEP = 0.01
SLIDER_MAX_INT_SPAN = 100  # wider integer ranges (max_new_tokens, top_k) are typed, not dragged

DECODING = (
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "presence_penalty",
    "frequency_penalty",
    "do_sample",
    "ignore_eos",
    "min_tokens",
    "seed",
    "stop",
    "include_stop_str_in_output",
    "stop_token_ids",
    "skip_special_tokens",
    "speculative",
)
POSTPROCESSING = (
    "postprocess",
    "strip_prompt",
    "drop_repeated_lines",
    "max_words",
    "trim_incomplete_sentence",
)
IN_MAIN_AREA = ("template",)

# Presets set the sampling knobs together; "balanced" is the server's own defaults (the served model's where it
# has them: RequestSchema.with_defaults).
PRESET_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "do_sample")
PRESETS: dict[str, dict[str, Any] | None] = {
    "precise": {"temperature": 0.2, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.3, "do_sample": True},
    "balanced": None,
    "creative": {"temperature": 1.1, "top_p": 0.98, "top_k": 0, "repetition_penalty": 1.1, "do_sample": True},
}

NULL_PLACEHOLDERS = {"seed": "random"}

# A boolean whose default is null (speculative) has three states; a toggle would send false, overriding the
# server's default, so it gets a choice whose first option sends null.
CHOICE3_LABELS: dict[bool | None, str] = {None: "server default", True: "on", False: "off"}


def widget_kind(param: Param) -> WidgetKind | None:
    """The widget for a field, or None for a type the UI does not know (the server default applies)."""
    if param.type == "boolean":
        return "toggle" if param.default is not None else "choice3"
    if param.type == "string" and param.choices:
        return "select"
    if param.type == "array":
        return "lines"
    if param.type in ("integer", "number"):
        low, high, _ = numeric_bounds(param)
        nullable = param.default is None
        if nullable or low is None or high is None:
            return "number"
        if param.type == "integer" and high - low > SLIDER_MAX_INT_SPAN:
            return "number"
        return "slider"
    return None


def numeric_bounds(param: Param) -> tuple[float | None, float | None, float]:
    """(lowest, highest, step) a widget may take; an exclusive minimum becomes its next step."""
    step: float = 1 if param.type == "integer" else FLOAT_STEP
    low = param.minimum
    if low is not None and param.exclusive_minimum:
        low = low + step
    high = param.maximum
    if param.type == "integer":
        low = None if low is None else int(low)
        high = None if high is None else int(min(high, JS_MAX_SAFE_INT))
    else:
        low = None if low is None else float(low)
        high = None if high is None else float(high)
    return low, high, step


# -- between request values and widget values -------------------------------------------------------


def to_widget(param: Param, value: Any) -> Any:
    """A request value as its widget holds it (clamped into the widget's range)."""
    kind = widget_kind(param)
    if kind == "lines":
        return "\n".join(escape_line(str(item)) for item in value or [])
    if kind == "choice3":
        return CHOICE3_LABELS[value if isinstance(value, bool) else None]  # isinstance: 1 is not True here
    if kind in ("slider", "number") and value is not None:
        low, high, _ = numeric_bounds(param)
        value = int(value) if param.type == "integer" else float(value)
        if low is not None:
            value = max(low, value)
        if high is not None:
            value = min(high, value)
    return value


def from_widget(param: Param, value: Any) -> Any:
    """A widget value as the request sends it."""
    kind = widget_kind(param)
    if kind == "lines":
        lines = [unescape_line(line) for line in str(value or "").split("\n") if line]
        if not lines and param.default is None:
            return None  # a list that is unset by default (allowed_token_ids): an empty one would mean none
        return [_integer(line) for line in lines] if param.item_type == "integer" else lines
    if kind == "choice3":
        return next((v for v, label in CHOICE3_LABELS.items() if label == value), None)
    if param.type == "number" and value is not None:
        return round(float(value), 6)  # slider arithmetic leaves 0.7000000000000001
    if param.type == "integer" and value is not None:
        return int(value)
    return value


def _integer(line: str) -> int | str:
    """A line of an integer list (stop_token_ids) as its integer; anything else as typed, for the server's
    400 to name the field."""
    try:
        return int(line.strip())
    except ValueError:
        return line


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def escape_line(text: str) -> str:
    """One stop string as a line of the stop box: a newline is written \\n, as people type it."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")


def unescape_line(line: str) -> str:
    return re.sub(r"\\([nt\\])", lambda m: _ESCAPES[m.group(1)], line)


# -- the request being edited ------------------------------------------------------------------------


class Form:
    """The request being edited: its values (as the request sends them) in session state, and its widgets.

    Each widget declares the current value as its default. Streamlit's browser side can fall back to a
    widget's declared default when reruns overlap (quick typing and clicking), so a widget declared
    with the schema default could silently undo the user's setting. For the same reason a programmatic
    change (a preset, reusing a history entry) never writes widget state: it starts a new generation
    of widget keys, whose new widgets declare the new values.
    """

    def __init__(self, state: MutableMapping[str, Any], schema: RequestSchema) -> None:
        self.state = state
        self.schema = schema
        self.values: dict[str, Any] = state.setdefault("form.values", {"prompt": ""})
        # The default each value started from. A value nobody changed follows the defaults in use: the page
        # may open on the built-in schema while the server loads, whose temperature 0.7 would otherwise
        # override the model's own default (GET /info) in every request once the server is ready.
        started_from: dict[str, Any] = state.setdefault("form.defaults", {})
        followed = False
        for param in self.editable():
            # Round trips through the widget: into the range of the server now answering.
            default = from_widget(param, to_widget(param, param.default))
            value = self.values.get(param.name, default)
            if param.choices and value not in param.choices:
                value = default
            value = from_widget(param, to_widget(param, value))
            if param.name in started_from and value == started_from[param.name] != default:
                value, followed = default, True
            started_from[param.name] = default
            self.values[param.name] = value
        if followed:  # new widgets declare the new values (see the class's doc)
            state["form.generation"] = state.get("form.generation", 0) + 1

    def editable(self) -> list[Param]:
        return [p for p in self.schema.params.values() if widget_kind(p) is not None]

    def key(self, name: str) -> str:
        return f"form.{name}.{self.state.get('form.generation', 0)}"

    def set(self, values: Mapping[str, Any]) -> None:
        """Change fields (and "prompt") from request values; for callbacks. Unknown fields are skipped."""
        for name, value in values.items():
            param = self.schema.params.get(name)
            if name == "prompt":
                self.values["prompt"] = str(value)
            elif param is not None and widget_kind(param) is not None:
                self.values[name] = from_widget(param, to_widget(param, value))
        self.state["form.generation"] = self.state.get("form.generation", 0) + 1

    def body(self) -> dict[str, Any]:
        """The /generate body: the prompt and every field the UI has a widget for."""
        return {"prompt": self.values["prompt"], **{p.name: self.values[p.name] for p in self.editable()}}

    def render_prompt(self, label: str, **kwargs: Any) -> None:
        self.values["prompt"] = st.text_area(
            label, value=self.values["prompt"], key=self.key("prompt"), **kwargs
        )

    def render(self, param: Param, disabled: bool = False) -> None:
        """Draw the widget for one field in the current container and keep what it holds."""
        widget = _WIDGETS[widget_kind(param)]  # type: ignore[index]  # only editable params get here
        held = widget(
            param,
            to_widget(param, self.values[param.name]),
            key=self.key(param.name),
            label=param.name,  # the API's own name, which is also what error messages and the docs call it
            help=param.description or None,
            disabled=disabled,
        )
        self.values[param.name] = from_widget(param, held)

    def render_sections(self) -> None:
        """The sidebar's parameter sections; fields the UI does not group go under "More"."""
        grouped = set(DECODING) | set(POSTPROCESSING) | set(IN_MAIN_AREA)
        editable = {p.name: p for p in self.editable()}
        others = tuple(name for name in editable if name not in grouped)
        for title, names in (("Decoding", DECODING), ("Post-processing", POSTPROCESSING), ("More", others)):
            params = [editable[n] for n in names if n in editable]
            if params:
                st.subheader(title)
            for param in params:
                # The fine post-processing switches mean nothing while post-processing is off.
                off = self.values.get("postprocess") is False and param.name in POSTPROCESSING[1:]
                self.render(param, disabled=off)


def preset_values(name: str, schema: RequestSchema) -> dict[str, Any]:
    preset = PRESETS[name]
    if preset is None:
        return {f: schema.params[f].default for f in PRESET_FIELDS if f in schema.params}
    return preset


# -- widgets, one per kind: (param, value, **common) -> what the widget holds ----------------------------


def _toggle(param: Param, value: Any, **common: Any) -> Any:
    return st.toggle(value=bool(value), **common)


def _choice3(param: Param, value: Any, **common: Any) -> Any:
    labels = tuple(CHOICE3_LABELS.values())
    return st.selectbox(options=labels, index=labels.index(value), **common)


def _select(param: Param, value: Any, **common: Any) -> Any:
    return st.selectbox(options=param.choices, index=param.choices.index(value), **common)


def _lines(param: Param, value: Any, **common: Any) -> Any:
    common["help"] = f"{common['help'] or ''} One per line; write \\n for a line break."
    return st.text_area(value=value, height=80, **common)


def _slider(param: Param, value: Any, **common: Any) -> Any:
    low, high, step = numeric_bounds(param)
    return st.slider(min_value=low, max_value=high, step=step, value=value, **common)


def _number(param: Param, value: Any, **common: Any) -> Any:
    low, high, step = numeric_bounds(param)
    placeholder = NULL_PLACEHOLDERS.get(param.name, "server default")
    return st.number_input(
        min_value=low, max_value=high, step=step, value=value, placeholder=placeholder, **common
    )


_WIDGETS = {
    "toggle": _toggle,
    "choice3": _choice3,
    "select": _select,
    "lines": _lines,
    "slider": _slider,
    "number": _number,
}
