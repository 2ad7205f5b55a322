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


@pytest.mark.slow
def test_playground_shows_the_groups_of_a_hierarchical_model(tmp_path, tiny_model_dir, browser):
    import shutil

    from moekit import build_model
    from moekit.config import ModelConfig
    from moekit.model_dir import save_model

    shutil.copyfile(tiny_model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    cfg = ModelConfig.from_dict(
        dict(vocab_size=512, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden=128,
             max_seq_len=128, moe=dict(num_experts=8, top_k=4, expert_hidden=64,
                                      router="hierarchical", router_groups=4, group_top_k=2))
    )  # fmt: skip
    save_model(build_model(cfg, seed=0), cfg, tmp_path)
    with running_server(tmp_path) as (url, _engine):
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        assert page.goto(url).status == 200
        page.wait_for_function("document.getElementById('model-info').textContent.includes('in 4')")
        info = page.locator("#model-info").inner_text()
        assert "8 experts, in 4 groups: top-2 groups, top-4 experts" in info
        # a gap before each group's first expert: 3 per chart, 2 charts
        assert page.locator(".bar.group-start").count() == 6
        assert page.locator(".bar").nth(5).get_attribute("title") == "expert 5 (group 2): 0 tokens"
        page.fill("#prompt", "The history of the city")
        page.fill("#max-tokens", "12")
        page.click("#generate")
        page.wait_for_selector("body[data-done='true']", timeout=60_000)
        assert page.locator("#output .tok").count() > 0
        page.locator("#output .tok").first.hover()
        tip = page.locator("#tooltip").inner_text()
        pairs = [p for line in tip.splitlines()[1:] for p in line.split(": ")[1].split("  ")]
        assert len(pairs) == 8  # 4 experts in each of 2 layers, each named with its group
        for pair in pairs:
            expert, group = pair.split()[0][1:].split("/g")
            assert int(expert) // 2 == int(group)
        page.screenshot(path=str(ARTIFACTS / "playground-hierarchical.png"), full_page=True)
    assert not errors, errors
