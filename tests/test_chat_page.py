"""The chat page at `lmforge serve`'s GET /, driven in headless Chromium against a real server.

Needs Playwright's Python package and the system Chromium (/usr/bin/chromium, Debian's `chromium`);
Playwright's own browser download is not used. Skips, saying why, when either is missing.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
from test_serve import Server

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 30_000

pytestmark = [
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason=f"no system Chromium at {CHROMIUM} (apt-get install chromium)"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None,
                       reason="the playwright package is not installed (pip install playwright)"),
]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context()  # a fresh localStorage per test
    context.set_default_timeout(TIMEOUT_MS)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def set_value(page, selector: str, value: str) -> None:
    page.fill(selector, value)
    page.dispatch_event(selector, "change")


def send(page, text: str) -> None:
    page.fill("#message", text)
    page.click("#send")


def wait_idle(page) -> None:
    """Until the answer in flight is done (the stop button goes back to disabled)."""
    page.wait_for_selector(".reply.streaming", state="detached")
    page.wait_for_function("document.querySelector('#stop').disabled")
    assert page.inner_text("#error") == "", page.inner_text("#error")


def test_chat_candidates_and_compare(tiny_run, tmp_path, page):
    feedback = tmp_path / "prefs.jsonl"
    server = Server(tiny_run, "--feedback", str(feedback), "--name", "tiny", "--slots", "2")
    try:
        page.goto(server.url)
        page.wait_for_function("document.querySelector('#model-info').textContent.startsWith('tiny')")
        page.click("#settings summary")
        assert page.is_visible("#compare-wrap")  # the server records feedback, so compare mode is offered
        set_value(page, "#max-tokens", "4")  # the tiny model's context is 32 tokens
        set_value(page, "#temperature", "1")

        # a streamed reply with its tokens/s
        send(page, "The first path")
        wait_idle(page)
        assert page.inner_text(".msg.user .text") == "The first path"
        assert page.inner_text(".reply").strip()
        assert "tokens/s" in page.inner_text(".tps")

        # candidates: each reply token is a span whose hover shows up to 5 alternatives with probabilities
        page.click("#new-chat")
        page.check("#candidates-toggle")
        send(page, "The new")
        wait_idle(page)
        token = page.locator(".reply .token").first
        token.hover()
        page.wait_for_selector("#candidates", state="visible")
        items = page.locator("#candidates li").all_inner_texts()
        assert 1 <= len(items) <= 5 and all(t.endswith("%") for t in items), items
        page.mouse.move(0, 0)
        page.wait_for_selector("#candidates", state="hidden")
        token.focus()  # keyboard users get them too
        page.wait_for_selector("#candidates", state="visible")
        page.uncheck("#candidates-toggle")

        # compare: two answers side by side, a vote, and the chosen one continues the chat
        page.click("#new-chat")
        page.check("#compare-toggle")
        send(page, "The valid")
        page.wait_for_selector("#vote-left:enabled")
        left, right = page.locator(".compare .reply").all_inner_texts()
        assert page.is_disabled("#send")  # no new turn before the vote
        page.click("#vote-left")
        page.wait_for_selector(".compare", state="detached")
        lines = feedback.read_text(encoding="utf-8").splitlines()
        assert len(lines) == 1
        record = json.loads(lines[0])
        assert record["messages"] == [{"role": "user", "content": "The valid"}]
        assert (record["chosen"], record["rejected"]) == (left, right) and "tie" not in record
        assert page.locator(".msg.assistant .reply").all_inner_texts() == [left]

        # chats survive a reload
        page.reload()
        page.wait_for_function("document.querySelector('#model-info').textContent.startsWith('tiny')")
        assert page.locator("#chat-list li").count() == 3
    finally:
        server.close()


def test_api_key_prompt(tiny_run, page):
    server = Server(tiny_run, "--api-key", "page-key", "--name", "tiny")
    try:
        page.goto(server.url)
        page.wait_for_function("document.querySelector('#error').textContent.includes('API key')")
        assert page.is_visible("#api-key")  # the settings open at the key field
        set_value(page, "#api-key", "page-key")
        page.wait_for_function("document.querySelector('#model-info').textContent.startsWith('tiny')")
        assert page.evaluate("localStorage.getItem('lmforge.apiKey')") == "page-key"
        set_value(page, "#max-tokens", "3")
        send(page, "The new")
        wait_idle(page)
        assert "tokens/s" in page.inner_text(".tps")
    finally:
        server.close()


def test_attention_on_hover(tiny_run, page):
    """serve --inspect: hovering a reply token shades the earlier tokens by the weights POST /inspect
    gives for the chat's messages plus the reply's token ids (the row of the pass that chose it)."""
    import httpx

    server = Server(tiny_run, "--inspect", "--name", "tiny", "--slots", "2")
    try:
        page.goto(server.url)
        page.wait_for_function("document.querySelector('#model-info').textContent.startsWith('tiny')")
        page.click("#settings summary")
        assert page.is_visible("#attention-wrap")  # offered: the server has --inspect
        page.check("#attention-toggle")
        set_value(page, "#max-tokens", "8")
        set_value(page, "#temperature", "0")
        send(page, "The new")
        wait_idle(page)

        # the same greedy answer's ids, and the weights the page should show for its last token
        messages = [{"role": "user", "content": "The new"}]
        reply = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "messages": messages, "max_tokens": 8, "temperature": 0, "logprobs": True}).json()
        ids = [x["token_id"] for x in reply["choices"][0]["logprobs"]["content"]]

        def row(k: int, head: int | None = None) -> tuple[list[float], int]:
            body = {"messages": messages, "continuation": ids, **({} if head is None else {"head": head})}
            data = httpx.post(server.url + "/inspect", json=body, timeout=60).json()
            q = data["prompt_tokens"] + k  # the token at q was chosen by the pass at q - 1
            return data["attention"][q - 1][:q], data["prompt_tokens"]

        def shown() -> list[float]:
            return page.eval_on_selector_all("#attention .key", "els => els.map((e) => parseFloat(e.dataset.w))")

        tokens = page.locator(".reply .token")
        assert tokens.count() >= 2, page.inner_text(".reply")
        last = tokens.nth(tokens.count() - 1)
        k = int(last.get_attribute("data-k"))
        last.hover()
        page.wait_for_selector("#attention .key")
        want, prompt = row(k)
        assert shown() == pytest.approx(want, abs=1e-9) and sum(shown()) == pytest.approx(1, abs=1e-4)
        assert "layer 1" in page.inner_text("#attention .title") and "mean of heads" in page.inner_text("#attention")
        # the reply's earlier tokens are shaded in place, each by the weight of the ids it holds
        first = tokens.nth(0)
        k0 = int(first.get_attribute("data-k"))
        assert float(first.get_attribute("data-w")) == pytest.approx(sum(want[prompt:prompt + k0 + 1]), abs=1e-9)
        assert first.evaluate("(e) => e.style.backgroundColor") != ""
        page.mouse.move(0, 0)
        page.wait_for_selector("#attention", state="hidden")
        assert page.locator(".reply .token[data-w]").count() == 0

        # one head instead of the mean; and after a reload, from the stored ids
        page.select_option("#attention-head", "0")
        last.hover()
        page.wait_for_selector("#attention .key")
        assert shown() == pytest.approx(row(k, head=0)[0], abs=1e-9) and "head 0" in page.inner_text("#attention")
        page.reload()
        page.wait_for_function("document.querySelector('#model-info').textContent.startsWith('tiny')")
        page.locator(".reply .token").nth(tokens.count() - 1).hover()
        page.wait_for_selector("#attention .key")
        assert shown() == pytest.approx(want, abs=1e-9)
    finally:
        server.close()
