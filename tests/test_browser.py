"""A real browser against the demo: Debian's Chromium driven by Playwright (never
``playwright install``). Screenshots go to ``test-artifacts/`` for a human to look at."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.test_app import served  # noqa: F401  (the app on a free local port over a tiny engine)

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} not installed"),
]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _int(page, selector: str) -> int:
    return int(page.inner_text(selector).strip().replace(",", ""))


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_shared_system_prompt_scenario_in_browser(served, browser):  # noqa: F811
    url, engine_thread = served
    ARTIFACTS.mkdir(exist_ok=True)
    engine_thread.call(lambda e: e.clear_cache())
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(url)
    page.wait_for_selector("#tree-info #tree-shared", timeout=60_000)  # live views arrived
    page.screenshot(path=str(ARTIFACTS / "browser-start.png"), full_page=True)

    page.click("#scenario-shared_system")

    # streamed text shows up in several lanes
    _wait_for(lambda: sum(page.locator(f"#lane-{i} .tok").count() > 0 for i in range(4)) >= 3, 60, "text in 3 lanes")
    page.screenshot(path=str(ARTIFACTS / "browser-streaming.png"), full_page=True)

    # when it is done: the tree has a shared node and the block map showed shared blocks
    _wait_for(lambda: "16</span> of 16" in page.inner_html("#scenario-box"), 120, "scenario to finish")
    _wait_for(lambda: _int(page, "#tree-shared") >= 1, 10, "a shared node in the tree")
    legend = page.eval_on_selector_all("#tree-plot .legendtext", "els => els.map(e => e.textContent)")
    assert any(t.startswith("shared by ≥2 requests") for t in legend), legend
    page.screenshot(path=str(ARTIFACTS / "browser-done.png"), full_page=True)

    # a token's distribution opens on click, with the chosen token marked
    page.locator("#lane-1 .tok").first.click()
    popup = page.locator("#dist-popup")
    popup.wait_for(state="visible", timeout=5_000)
    assert popup.locator("tr.chosen").count() == 1
    assert "%" in popup.inner_text()
    page.screenshot(path=str(ARTIFACTS / "browser-distribution.png"))
    assert not errors, errors
    page.close()


def test_block_map_shows_shared_blocks_while_running(served, browser):  # noqa: F811
    """Shared blocks exist only while requests hold them: look while the scenario runs."""
    url, engine_thread = served
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.goto(url)
    page.wait_for_selector("#blocks-info #blocks-shared", timeout=60_000)
    # The tiny model finishes a scenario in well under a second on a fast machine, and shared
    # blocks exist only while requests run: slow every step so the page's refresh (every 0.5 s)
    # sees them. 0.05 s a step (a ~2.5 s window) missed them once in a loaded full run; the hook
    # comes off as soon as they show, so a longer window costs the test nothing.
    engine_thread.fault_hook = lambda: time.sleep(0.25)
    try:
        page.click("#scenario-shared_system")
        seen = {"shared": 0}

        def shared_now() -> bool:
            seen["shared"] = max(seen["shared"], _int(page, "#blocks-shared"))
            return seen["shared"] >= 1

        _wait_for(shared_now, 60, "shared blocks in the block map")
        page.screenshot(path=str(ARTIFACTS / "browser-blocks-shared.png"), full_page=True)
        assert page.locator("#block-plot .heatmaplayer, #block-plot .hm").count() >= 1
    finally:
        engine_thread.fault_hook = None
    _wait_for(lambda: "16</span> of 16" in page.inner_html("#scenario-box"), 120, "scenario to finish")
    engine_thread.call(lambda e: e.check_integrity())
    page.close()
