"""The web page and the API docs in a real browser: Debian's chromium, headless, driven by Selenium.

The page must work offline and by keyboard: it loads nothing from elsewhere (the server's CSP
forbids it, and the browser's network log is checked), a comment typed and submitted with the
keyboard gets one bar per label, and it is readable in a phone-sized window.
"""

from __future__ import annotations

import json

from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from api.local import ApiProcess
from tests.fixtures.models import TEST_LABELS


def _bars(browser) -> dict[str, float]:
    return {li.get_attribute("data-label"): float(li.find_element(By.CSS_SELECTOR, ".value").text) for li in browser.find_elements(By.CSS_SELECTOR, "#bars li")}


def _flagged_bars(browser) -> set[str]:
    return {li.get_attribute("data-label") for li in browser.find_elements(By.CSS_SELECTOR, "#bars li.flagged")}


def _flags_line(flags: list[str]) -> str:
    """What the page says for a record's flags (app.js)."""
    return "Flagged: " + ", ".join(f.replace("_", " ") for f in flags) if flags else "Not flagged for any label."


def test_page_scores_a_typed_comment_by_keyboard(shared_api: ApiProcess, browser) -> None:
    browser.get(shared_api.base_url + "/")
    assert browser.title == "ESP: score a comment"
    box = browser.switch_to.active_element
    box.send_keys(Keys.TAB)  # focus moves into the page; the comment box is reachable by keyboard
    comment = browser.find_element(By.ID, "comment")
    comment.click()
    text = "You are a wonderful person, thank you for the careful edit."
    comment.send_keys(text)
    comment.send_keys(Keys.CONTROL, Keys.ENTER)
    WebDriverWait(browser, 20).until(ec.text_to_be_present_in_element((By.ID, "status"), "Scored."))
    bars = _bars(browser)
    assert set(bars) == set(TEST_LABELS)
    expected = shared_api.post_json("/v1/score", {"text": text})[2]["scores"]
    assert all(abs(bars[label] - expected[label]) < 1e-3 for label in TEST_LABELS)
    meta = browser.find_element(By.ID, "meta").text
    assert "Model bert v1" in meta and "ms round trip" in meta
    flags = browser.find_element(By.ID, "flags").text
    assert flags.startswith("Flagged: ") or flags == "Not flagged for any label."
    answer = shared_api.post_json("/v1/score", {"text": text})[2]
    assert not answer["flags"], "the test model flags nothing in this text"
    assert (flags, _flagged_bars(browser)) == (_flags_line(answer["flags"]), set(answer["flags"]))
    # A text the test model flags: the page shows the API's flags for it, in its words and on its bars.
    answer = shared_api.post_json("/v1/score", {"text": "x"})[2]
    assert answer["flags"], "the test model flags this text"
    comment.clear()
    comment.send_keys("x", Keys.CONTROL, Keys.ENTER)
    WebDriverWait(browser, 20).until(ec.text_to_be_present_in_element((By.ID, "flags"), "Flagged: "))
    assert browser.find_element(By.ID, "status").text == "Scored."
    assert browser.find_element(By.ID, "flags").text == _flags_line(answer["flags"])
    assert _flagged_bars(browser) == set(answer["flags"])
    # Every request the page made went to this server.
    for entry in browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)"):
        assert entry.startswith(shared_api.base_url), entry


def test_examples_errors_and_phone_width(shared_api: ApiProcess, browser) -> None:
    browser.set_window_size(390, 844)
    browser.get(shared_api.base_url + "/")
    submit = browser.find_element(By.ID, "submit")
    submit.click()  # nothing typed: a clear message, no request
    assert "Type or paste a comment first." in browser.find_element(By.ID, "status").text
    example = browser.find_elements(By.CSS_SELECTOR, "button.example")[2]
    example.send_keys(Keys.ENTER)  # a keyboard press on an example scores it
    WebDriverWait(browser, 20).until(ec.text_to_be_present_in_element((By.ID, "status"), "Scored."))
    assert browser.find_element(By.ID, "comment").get_attribute("value") == example.get_attribute("data-text")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#bars li")) == len(TEST_LABELS)
    width = browser.execute_script("return document.documentElement.scrollWidth")
    assert width <= 390, f"the page scrolls sideways on a phone ({width}px wide)"
    # An error from the API is shown with its message.
    # Typing 21,000 keys one by one takes minutes in a browser; a paste is one event.
    browser.execute_script("document.getElementById('comment').value = 'x'.repeat(21000)")
    submit.click()
    WebDriverWait(browser, 20).until(ec.text_to_be_present_in_element((By.ID, "status"), "Could not score"))
    assert "limit is" in browser.find_element(By.ID, "status").text


def test_swagger_docs_render_offline(shared_api: ApiProcess, browser) -> None:
    browser.get(shared_api.base_url + "/docs")
    WebDriverWait(browser, 30).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".opblock")) >= 3)
    summaries = " ".join(e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"))
    assert "/v1/score" in summaries and "/v1alpha1/comments:analyze" in summaries
    spec = json.loads(browser.execute_script("return JSON.stringify(window.ui.specSelectors.specJson().toJS().info)"))
    assert spec["title"] == "ESP scoring API"
