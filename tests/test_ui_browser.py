"""The UI in a real browser: `streamlit run ui/app.py` against the tiny server, driven in headless Chromium.

Debian's chromium (scripts/install.sh installs it) is driven by Playwright's Python package; Playwright's
own browser download is never used. The screenshot lands in test-artifacts/ for a person to look at.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from tests.server import ROOT, Server, free_port
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


@pytest.fixture
def streamlit_url(tiny_server: Server, tmp_path: Path) -> Iterator[str]:
    """`streamlit run ui/app.py` as a user starts it, pointed at the tiny server by TEXTGEN_URL."""
    port = free_port()
    command = [sys.executable, "-m", "streamlit", "run", "ui/app.py", "--server.headless", "true"]
    command += ["--server.port", str(port), "--browser.gatherUsageStats", "false"]
    log_path = tmp_path / "streamlit.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, "TEXTGEN_URL": tiny_server.url},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _answers(f"{url}/_stcore/health"):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"streamlit did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def set_number(page: Page, name: str, value: int) -> None:
    box = page.get_by_role("spinbutton", name=name, exact=True)
    box.fill(str(value))
    box.press("Enter")  # Streamlit takes a typed number on Enter
    expect(box).to_have_value(str(value))


def test_type_a_prompt_generate_and_download_the_history(streamlit_url, tiny_server, tmp_path):
    assert CHROMIUM.exists(), "Debian's chromium is missing: run scripts/install.sh"
    prompt = "What is AI?"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # empty: no state from earlier runs
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
            accept_downloads=True,
        )
        try:
            page = browser.new_page()
            page.goto(streamlit_url)
            expect(page.get_by_text("Server ready")).to_be_visible(timeout=30_000)
            set_number(page, "max_new_tokens", 24)
            set_number(page, "seed", 42)
            page.get_by_role("textbox", name="Prompt", exact=True).fill(prompt)
            page.get_by_role("button", name="Generate").click()
            expect(page.get_by_text("Completion tokens")).to_be_visible(timeout=60_000)
            expect(page.get_by_text("#1 · completed · What is AI?")).to_be_visible()

            with page.expect_download() as download:
                page.get_by_role("button", name="Download JSON").click()
            (entry,) = json.loads(Path(download.value.path()).read_text())

            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "ui-browser.png"), full_page=True)
        finally:
            browser.close()

    # What the page sent and showed is what the server generates for the same request.
    state: dict = {}
    schema = fallback_request_schema()
    controls.init_state(state, schema)
    expected_body = {**controls.request_body(state, schema, prompt), "max_new_tokens": 24, "seed": 42}
    assert {"prompt": entry["prompt"], **entry["parameters"]} == expected_body
    with TextgenClient(tiny_server.url) as client, client.stream(expected_body) as generation:
        expected_text = "".join(generation)
    assert entry["output"] == expected_text and entry["outcome"] == "completed"
    assert entry["seed"] == 42 and entry["model"] == "tiny-gpt2"
