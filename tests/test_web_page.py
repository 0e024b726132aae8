"""The chat page at GET /, in headless Chromium (Debian's /usr/bin/chromium driven by Playwright): it loads with
no network but the server, streams an answer, shows tokens per second, and the answer is visible on screen; a
thinking model's reasoning is shown collapsed above its answer."""

from __future__ import annotations

import io
import os
import shutil

import pytest

from tests.conftest import API_KEY

CHROMIUM = os.environ.get("PAGODA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if not shutil.which(CHROMIUM):
        pytest.fail(f"Chromium not found at {CHROMIUM}: `make test` installs Debian's chromium package")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


def dark_pixel_fraction(png: bytes) -> float:
    from PIL import Image

    histogram = Image.open(io.BytesIO(png)).convert("L").histogram()  # 256 grey levels
    return sum(histogram[:100]) / sum(histogram)


def test_chat_page_streams_an_answer(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    requests_elsewhere = []
    page.on("request", lambda r: None if r.url.startswith(server.url) else requests_elsewhere.append(r.url))
    page.goto(server.url + "/")
    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.getElementById('model').textContent === 'smol'")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "40")
    before = page.screenshot()
    page.fill("#prompt", "What is the capital of France?")
    page.click("#send")
    answer = page.locator(".msg.assistant").last
    page.wait_for_selector(".msg.assistant[data-state=done]", timeout=60_000)
    text = answer.locator("span").inner_text()
    stats = answer.locator(".stats").inner_text()
    assert "Paris" in text
    assert "tokens/s" in stats and "first token after" in stats
    assert page.locator(".msg.error").count() == 0
    after = page.screenshot(path=str(tmp_path / "chat.png"))
    # The screenshot shows the conversation: more dark (text) pixels than the empty page, in the answer's box.
    assert dark_pixel_fraction(after) > dark_pixel_fraction(before)
    assert dark_pixel_fraction(answer.screenshot()) > 0.005
    assert requests_elsewhere == []  # no CDN, nothing but the server
    page.close()


def test_chat_page_reports_errors(server, browser):
    page = browser.new_page()
    page.goto(server.url + "/")
    page.fill("#api-key", "wrong-key")
    page.dispatch_event("#api-key", "change")
    page.fill("#prompt", "Hello")
    page.click("#send")
    page.wait_for_selector(".msg.error", timeout=30_000)
    assert "Incorrect API key" in page.locator(".msg.error").inner_text()
    page.close()


def test_chat_page_shows_reasoning_collapsed_above_the_answer(qwen3_server, browser):
    page = browser.new_page()
    page.goto(qwen3_server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent === 'tiny-qwen3'")
    page.fill("#temperature", "0")
    page.fill("#prompt", "What is 6 times 7?")
    page.click("#send")
    page.wait_for_selector(".msg.assistant[data-state=done]", timeout=60_000)
    answer = page.locator(".msg.assistant").last
    assert answer.locator("span").inner_text() == "The answer is 42."  # no think text in the answer
    details = answer.locator("details.reasoning")
    assert details.count() == 1
    assert details.evaluate("(d) => d.nextElementSibling.tagName") == "SPAN"  # above the answer
    assert details.get_attribute("open") is None  # collapsed
    assert details.locator("summary").inner_text() == "Reasoning"
    assert not details.locator("div").is_visible()
    details.locator("summary").click()
    assert details.locator("div").is_visible()
    assert details.locator("div").inner_text() == "I should plan."
    assert page.locator(".msg.error").count() == 0
    page.close()
