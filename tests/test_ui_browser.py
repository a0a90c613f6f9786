"""The UI in a real browser: `streamlit run ui/app.py` against the tiny server, driven in headless Chromium.

Debian's chromium (scripts/install.sh installs it) is driven by Playwright's Python package; Playwright's
own browser download is never used. The screenshot lands in test-artifacts/ for a person to look at.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import BrowserContext, Page, expect, sync_playwright

from tests.server import ROOT, Server, start_process
from tests.test_ui_servers import FINAL, Reply, ScriptedServer, sse
from ui import controls
from ui.client import TextgenClient, fallback_request_schema

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = ROOT / "test-artifacts"


def streamlit_command(port: int) -> list[str]:
    """`streamlit run ui/app.py` as a user starts it (README), on a test port."""
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        "ui/app.py",
        "--server.headless",
        "true",
        "--server.address",
        "127.0.0.1",
        "--server.port",
        str(port),
        "--browser.gatherUsageStats",
        "false",
    ]


@pytest.fixture(scope="module")
def streamlit_url(tiny_server: Server) -> Iterator[str]:
    env = {"TEXTGEN_URL": tiny_server.url}
    with start_process(streamlit_command, env, ready_timeout=60, ready_path="/_stcore/health") as app:
        yield app.url


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    assert CHROMIUM.exists(), "Debian's chromium is missing: run scripts/install.sh"
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),  # empty: no state from earlier runs
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
            accept_downloads=True,
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser: BrowserContext, streamlit_url: str) -> Iterator[Page]:
    """A fresh tab, so a fresh Streamlit session."""
    page = browser.new_page()
    try:
        page.goto(streamlit_url)
        expect(page.get_by_text("Server ready")).to_be_visible(timeout=30_000)
        yield page
    finally:
        page.close()


def set_number(page: Page, name: str, value: int) -> None:
    box = page.get_by_role("spinbutton", name=name, exact=True)
    box.fill(str(value))
    box.press("Enter")  # Streamlit takes a typed number on Enter
    expect(box).to_have_value(str(value))


def generate(page: Page, prompt: str) -> None:
    page.get_by_role("textbox", name="Prompt", exact=True).fill(prompt)
    page.get_by_role("button", name="Generate").click()


def test_type_a_prompt_generate_and_download_the_history(page, tiny_server):
    prompt = "What is AI?"
    set_number(page, "max_new_tokens", 24)
    set_number(page, "seed", 42)
    generate(page, prompt)
    expect(page.get_by_text("Completion tokens")).to_be_visible(timeout=60_000)
    expect(page.get_by_text("#1 · completed · What is AI?")).to_be_visible()

    with page.expect_download() as download:
        page.get_by_role("button", name="Download JSON").click()
    (entry,) = json.loads(Path(download.value.path()).read_text())

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui-browser.png"), full_page=True)

    # What the page sent and showed is what the server generates for the same request.
    form = controls.Form({}, fallback_request_schema())
    form.set({"prompt": prompt, "max_new_tokens": 24, "seed": 42})
    expected_body = form.body()
    assert {"prompt": entry["prompt"], **entry["parameters"]} == expected_body
    with TextgenClient(tiny_server.url) as client, client.stream(expected_body) as generation:
        expected_text = "".join(generation)
    assert entry["output"] == expected_text and entry["outcome"] == "completed"
    assert entry["seed"] == 42 and entry["model"] == "tiny-gpt2"


def test_stop_ends_the_stream_and_keeps_the_text(page):
    # The tiny model finishes before anyone can click, so a scripted server streams slowly here.
    slow = Reply(
        content_type="text/event-stream",
        chunks=[sse({"text": f"word{i} "}) for i in range(100)] + [sse({"text": "", **FINAL})],
        pause=0.1,
    )
    with ScriptedServer({"/readyz": Reply(chunks=[b"ok"]), "/generate_stream": slow}) as server:
        url = page.get_by_role("textbox", name="URL", exact=True)
        url.fill(server.url)
        url.press("Enter")  # the server URL can be changed in the page
        expect(page.get_by_text("Built-in defaults")).to_be_visible()  # it has no /docs.json
        generate(page, "Tell me a story")
        expect(page.get_by_text("word5", exact=False)).to_be_visible(timeout=10_000)
        page.get_by_test_id("stBaseButton-secondary").filter(has_text="Stop").click()
        expect(page.get_by_text("#1 · stopped · Tell me a story")).to_be_visible()
        expect(page.get_by_text("Stopped after")).to_be_visible()
        deadline = time.monotonic() + 5
        while not server.dropped and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.dropped == ["/generate_stream"]  # the connection closed: the server can cancel


@pytest.mark.real_model
def test_default_settings_answer_with_the_offline_default_model(browser, default_server):
    """A newcomer's first try (issue #13): the real model, every control as the page starts, no template chosen.

    The page starts its sampling widgets at the model's own defaults (GET /info), so it asks what a default
    API body asks. The page's one request is a lone stream, whose prompt goes through the compiled pass on
    AMX: there, with temperature 0.05 (the preset until session 29), 145 of 150 and 194 of 200 answers
    named Paris, the rest "L'Étoile, la Cité de France is the capital of France." (the first token is a near
    tie, "L" with 0.92 of "The"'s mass); at temperature 0.02, 200/200 one at a time and 600/600 in each
    format `auto` serves (bench/results/offline-preset.md). On an AVX2 AMD EPYC (Zen 3, session 44) `auto`
    is float32-int8head with 7-bit output weights, and they bring "L" nearer: first-token logprobs -2.057
    ("The") and -2.089 ("L") for a lone stream, 0.033 nats apart against float32's 0.082 on the same CPU:
    asked one at a time, 73 of 80 answers named Paris (100 of 100 in waves of 20), and one suite run saw
    two misses in a row. So the question is asked up to three times, and fails only if all three miss.
    """
    model_defaults = httpx.get(f"{default_server.url}/info", timeout=10).json()["sampling_defaults"]["values"]
    assert model_defaults, "the offline default has a preset of its own"
    with start_process(
        streamlit_command, {"TEXTGEN_URL": default_server.url}, ready_timeout=60, ready_path="/_stcore/health"
    ) as app:
        page = browser.new_page()
        try:
            page.goto(app.url)
            expect(page.get_by_text("Server ready")).to_be_visible(timeout=60_000)
            question = "What is the capital of France?"
            for attempt in (1, 2, 3):
                generate(page, question)
                expect(page.get_by_text(f"#{attempt} · completed · {question}")).to_be_visible(
                    timeout=120_000
                )
                expect(page.get_by_text("No text: the model ended at once")).to_have_count(0)
                with page.expect_download() as download:
                    page.get_by_role("button", name="Download JSON").click()
                entries = json.loads(Path(download.value.path()).read_text())
                if "Paris" in entries[-1]["output"]:
                    break
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "ui-default-settings.png"), full_page=True)
        finally:
            page.close()
    for entry in entries:
        assert entry["outcome"] == "completed" and entry["output"].strip(), entry
        assert entry["parameters"].get("template", "auto") == "auto"  # the page's default, not the test's
        sent = {name: entry["parameters"][name] for name in model_defaults}
        assert sent == model_defaults, entry["parameters"]  # not the route's temperature 0.7
    assert "Paris" in entries[-1]["output"], entries
