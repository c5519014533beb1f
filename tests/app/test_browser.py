"""The app in Debian's headless chromium, driven by Playwright, on the embedded default (the toy
world's demo): a chat turn, its reply and routing picture, a change of strategy and granularity,
the side-by-side mode, a per-layer view, the Library tab's clusters and a refused prompt.

Screenshots are kept in tests/artifacts/browser/ (git-ignored) for people to look at.
"""

from pathlib import Path

import pytest

from quiver.app.libraries import cluster_library, cluster_rows
from quiver.toyworld import DOMAINS
from quiver.toyworld.pipeline import task_owners

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).parents[1] / "artifacts" / "browser"
WAIT_MS = 120_000  # the first Arrow answer of a fresh $QUIVER_HOME compiles the routing kernels
WORDS = "bar dis fun"

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


@pytest.fixture(scope="module")
def owners(engine):
    """Task name -> the demo's expert trained on it."""
    return task_owners(engine.library)


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


def last_reply(page, pane: str) -> str:
    return page.locator(f"#chat-{pane} .bot.message").last.inner_text().strip()


def test_a_chat_turn_routes_to_the_prompts_expert_and_shows_it(page, owners):
    before = picture(page, "a")
    send(page, f"map each : {WORDS}")

    line = wait_for_routing(page, "a", "chosen for the whole answer")

    assert line.split(": ", 1)[1].startswith(owners["words-each"])  # it got the most weight
    expected = " ".join(DOMAINS["words"].map(word) for word in WORDS.split())
    assert last_reply(page, "a") == expected
    assert page.locator("#chat-a .user.message").first.inner_text() == f"map each : {WORDS}"
    assert picture(page, "a") != before  # the picture of this answer replaced the placeholder
    page.screenshot(path=ARTIFACTS / "chat-arrow-per-sequence.png", full_page=True)


def test_switching_the_strategy_to_one_expert(page, owners):
    page.click("#strategy-a input[value='single']")
    page.locator("#expert-a").wait_for(state="visible")
    page.click("#expert-a input")
    page.get_by_role("option", name=owners["numbers-each"]).click()
    send(page, "map each : 3 1 4")

    line = wait_for_routing(page, "a", f"{owners['numbers-each']} 100%")

    assert page.locator("#chat-a .bot.message").count() == 2
    assert last_reply(page, "a") == " ".join(DOMAINS["numbers"].map(d) for d in ("3", "1", "4"))
    assert line.count(" 0%") == 3
    page.screenshot(path=ARTIFACTS / "chat-one-expert.png", full_page=True)


def test_arrow_per_token_shows_each_experts_share(page):
    page.click("#strategy-a input[value='arrow']")
    page.click("#granularity-a input[value='token']")
    send(page, "map last : !? @# #$")

    line = wait_for_routing(page, "a", "share of the weight")

    assert line.count("%") == 4
    page.screenshot(path=ARTIFACTS / "chat-arrow-per-token.png", full_page=True)
    page.click("#granularity-a input[value='sequence']")


def test_side_by_side_answers_with_two_strategies(page):
    page.check("#side-by-side input")
    send(page, f"map each : {WORDS}")

    wait_for_routing(page, "b", "from the base model: no routing")
    assert page.locator("#chat-b .bot.message").count() == 1
    wait_for_routing(page, "a", "chosen for the whole answer")
    page.screenshot(path=ARTIFACTS / "chat-side-by-side.png", full_page=True)


def test_the_per_layer_view_redraws_the_picture(page):
    mean = picture(page, "a")

    page.click("#layers-a input")
    page.get_by_role("option", name="layer 0").click()
    page.wait_for_function(
        "src => document.querySelector('#routing-a img').getAttribute('src') !== src", arg=mean
    )

    page.screenshot(path=ARTIFACTS / "chat-layer-0.png", full_page=True)


def test_the_library_tab_shows_the_experts_mbc_clusters(page, engine):
    page.get_by_role("tab", name="Library").click()
    page.get_by_label("Library", exact=True).fill(engine.library.repo_id)
    page.get_by_role("button", name="Open", exact=True).click()

    page.locator("#similarity img").wait_for()
    page.wait_for_function(
        "names => names.every(n => document.querySelector('#clusters').innerText.includes(n))",
        arg=engine.library.names,
    )

    cells = [c for c in page.locator("#clusters").inner_text().split("\n") if c.strip()]
    clusters = cluster_rows(cluster_library(engine.library))  # as quiver.training clusters them
    assert cells[1:] == ["cluster", "experts", *(cell for row in clusters for cell in row)]
    listed = ", ".join(cells[4::2]).split(", ")  # each cluster's experts
    assert sorted(listed) == sorted(engine.library.names)
    page.screenshot(path=ARTIFACTS / "library-clusters.png", full_page=True)
    page.get_by_role("tab", name="Chat").click()


def test_a_refused_prompt_is_explained_and_kept(page):
    too_long = "map each : " + "1 2 3 " * 12  # the demo model reads 32 tokens
    send(page, too_long)

    page.get_by_text("reads at most 32").first.wait_for()

    assert page.locator("#message textarea").input_value() == too_long
    page.wait_for_timeout(1000)  # let the toast finish fading in
    page.screenshot(path=ARTIFACTS / "chat-error.png")
