"""The chat page at `/`, in headless Chromium: type a question, see the reasoning stream into its collapsible block
and the answer below it.

Needs the `playwright` Python package (its own driver) and a Chromium binary: the system's /usr/bin/chromium (CI
installs it, see .ci/run) or one named by R1LAB_CHROMIUM. Skipped, saying which is missing, when either is absent.
"""

from __future__ import annotations

import os
import shutil

import pytest
from test_serve import ANSWER, MODEL_ID, REASONING, ServerThread, scripted_model_dir

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str | None:
    for candidate in (os.environ.get("R1LAB_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


@pytest.fixture(scope="module")
def page_server(tmp_path_factory):
    pytest.importorskip("fastapi")
    from r1lab.serve.app import create_app

    app = create_app(scripted_model_dir(tmp_path_factory.mktemp("page-model")), served_model_name=MODEL_ID,
                     device="cpu", log_level="warning")
    with ServerThread(app) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    executable = chromium_path()
    if executable is None:
        pytest.skip("no Chromium: install it (apt-get install chromium) or set R1LAB_CHROMIUM")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.mark.slow
def test_question_streams_reasoning_and_answer(page_server, browser, tmp_path):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1100, "height": 700})
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(page_server.url + "/")
    expect(page.locator("#model")).to_have_text(MODEL_ID)
    page.fill("#max_tokens", "64")
    page.fill("#prompt", "What is 6*7?")
    page.press("#prompt", "Enter")

    reply = page.locator(".message.assistant").last
    expect(reply.locator(".answer")).to_have_text(ANSWER, timeout=30_000)
    expect(reply.locator("details.reasoning")).to_be_visible()
    expect(reply.locator(".reasoning-text")).to_have_text(REASONING)
    expect(reply.locator(".meta")).to_contain_text("13 tokens")
    assert int(reply.get_attribute("data-chunks")) >= 8  # it arrived as a stream of deltas, not in one piece
    expect(page.locator(".message.user")).to_have_text("What is 6*7?")
    reply.locator("details.reasoning summary").click()  # the reasoning block folds away
    expect(reply.locator(".reasoning-text")).to_be_hidden()
    reply.locator("details.reasoning summary").click()
    page.screenshot(path=str(tmp_path / "chat_page.png"))
    assert not errors
    page.close()
