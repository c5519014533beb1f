"""The app in Debian's headless chromium, driven by Playwright: a chat turn on the embedded default,
its reply and routing picture, a change of strategy, the side-by-side mode and a per-layer view.

Screenshots are kept in tests/artifacts/browser/ (git-ignored) for people to look at.
"""

from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).parents[1] / "artifacts" / "browser"
WAIT_MS = 120_000  # the first Arrow answer of a fresh $QUIVER_HOME compiles the routing kernels

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def page(app):
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (run `make browser`)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(WAIT_MS)
        page.goto(app.local_url)
        yield page
        browser.close()


def send(page, message: str) -> None:
    page.fill("#message textarea", message)
    page.click("#send")


def wait_for_routing(page, pane: str, text: str) -> str:
    """Wait until the routing line under ``pane``'s picture says ``text``; return the line."""
    summary = page.locator(f"#summary-{pane}")
    summary.filter(has_text=text).wait_for()
    return summary.inner_text()


def picture(page, pane: str) -> str:
    return page.locator(f"#routing-{pane} img").get_attribute("src")


def test_a_chat_turn_shows_the_reply_and_its_routing(page):
    before = picture(page, "a")
    send(page, "Hello, routed model!")

    line = wait_for_routing(page, "a", "share of the weight")

    assert all(name in line for name in ("amber", "birch", "cobalt", "dune"))
    replies = page.locator("#chat-a .bot.message")
    assert replies.count() == 1 and replies.first.inner_text().strip()
    assert page.locator("#chat-a .user.message").first.inner_text() == "Hello, routed model!"
    assert picture(page, "a") != before  # the heat-map of this answer replaced the placeholder
    page.screenshot(path=ARTIFACTS / "chat-arrow.png", full_page=True)


def test_switching_the_strategy_to_one_expert(page):
    page.click("#strategy-a input[value='single']")
    page.locator("#expert-a").wait_for(state="visible")
    send(page, "Only one expert now")

    line = wait_for_routing(page, "a", "amber 100%")

    assert page.locator("#chat-a .bot.message").count() == 2
    assert "birch 0%" in line
    page.screenshot(path=ARTIFACTS / "chat-one-expert.png", full_page=True)


def test_side_by_side_answers_with_two_strategies(page):
    page.click("#strategy-a input[value='arrow']")
    page.check("#side-by-side input")
    send(page, "Compare two strategies")

    wait_for_routing(page, "b", "from the base model: no routing")
    assert page.locator("#chat-b .bot.message").count() == 1
    wait_for_routing(page, "a", "share of the weight")
    page.screenshot(path=ARTIFACTS / "chat-side-by-side.png", full_page=True)


def test_the_per_layer_view_redraws_the_picture(page):
    mean = picture(page, "a")

    page.click("#layers-a input")
    page.get_by_role("option", name="layer 0").click()
    page.wait_for_function(
        "src => document.querySelector('#routing-a img').getAttribute('src') !== src", arg=mean
    )

    page.screenshot(path=ARTIFACTS / "chat-layer-0.png", full_page=True)


def test_a_refused_prompt_is_explained_and_kept(page):
    too_long = "x" * 600
    send(page, too_long)

    page.get_by_text("reads at most 512").first.wait_for()

    assert page.locator("#message textarea").input_value() == too_long
    page.wait_for_timeout(1000)  # let the toast finish fading in
    page.screenshot(path=ARTIFACTS / "chat-error.png")
