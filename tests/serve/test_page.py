"""The playground page in real headless Chromium: load it, generate, watch the experts. The
server has an API key, as a server on a shared machine would: the page is opened as
/?key=KEY, like a notebook server's tokenised link."""

import pytest

from ..conftest import ARTIFACTS
from .conftest import running_server


@pytest.mark.slow
def test_playground_streams_tokens_and_routing(tiny_model_dir, browser):
    with running_server(tiny_model_dir, api_key="sesame") as (url, _engine):
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        external: list[str] = []
        page.on("request", lambda r: None if r.url.startswith(url) else external.append(r.url))
        assert page.goto(url).status == 401  # no key, no page
        assert page.goto(f"{url}/?key=sesame").status == 200
        page.wait_for_function("document.getElementById('model-info').textContent.includes('tiny')")
        assert "sesame" not in page.url  # taken out of the address bar
        page.reload()  # the cookie brings the page back, the tab remembers the key
        page.wait_for_function("document.getElementById('model-info').textContent.includes('tiny')")
        assert page.locator("#top-k option").count() == 8
        assert page.locator(".chart").count() == 2  # one per MoE layer
        page.fill("#prompt", "def main():")
        page.fill("#max-tokens", "24")
        page.click("#generate")
        page.wait_for_selector("body[data-done='true']", timeout=60_000)
        tokens = page.locator("#output .tok")
        assert tokens.count() > 0
        assert "finished" in page.locator("#status").inner_text()
        colours = tokens.evaluate_all("els => els.map(e => getComputedStyle(e).backgroundColor)")
        assert all(c not in ("rgba(0, 0, 0, 0)", "transparent") for c in colours)
        heights = page.locator(".bar").evaluate_all(
            "els => els.map(e => parseFloat(e.style.height))"
        )
        assert max(heights) == 100.0 and sum(h > 0 for h in heights) >= 2
        tokens.first.hover()
        assert "layer 0:" in page.locator("#tooltip").inner_text()
        page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
    assert not errors, errors
    assert not external, f"the page fetched from outside the server: {external}"
    assert (ARTIFACTS / "playground.png").stat().st_size > 10_000
