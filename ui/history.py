"""What one generation of the session was (prompt, parameters, output, outcome), and its JSON export."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from ui.client import Completion, TextgenError

Outcome = Literal["running", "completed", "stopped", "failed"]


@dataclass
class Entry:
    prompt: str
    parameters: dict[str, Any]  # the request body without the prompt
    endpoint: str
    time: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    outcome: Outcome = "running"
    output: str = ""
    finish_reason: str | None = None
    model: str | None = None
    seed: int | None = None
    usage: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    error_command: str | None = None

    @classmethod
    def for_request(cls, body: dict[str, Any], endpoint: str) -> Entry:
        parameters = {k: v for k, v in body.items() if k != "prompt"}
        return cls(prompt=body["prompt"], parameters=parameters, endpoint=endpoint)

    def complete(self, completion: Completion) -> None:
        self.outcome = "completed"
        self.output = completion.text
        self.finish_reason = completion.finish_reason
        self.model = completion.model
        self.seed = completion.seed
        self.usage = completion.usage
        self.timings = completion.timings

    def fail(self, error: TextgenError, partial: str) -> None:
        self.outcome = "failed"
        self.output = partial
        self.error = error.message
        self.error_command = error.command

    def stop(self, partial: str) -> None:
        self.outcome = "stopped"
        self.output = partial

    def reusable(self) -> dict[str, Any]:
        """The request that reproduces this entry: its parameters, and the seed the server drew."""
        values = {**self.parameters, "prompt": self.prompt}
        if values.get("seed") is None and self.seed is not None:
            values["seed"] = self.seed
        return values


def export_json(entries: list[Entry]) -> str:
    return json.dumps([asdict(e) for e in entries], indent=2, ensure_ascii=False)
