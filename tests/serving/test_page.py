"""The one-bin page: its routes on the server app, and a real headless browser using it."""

from __future__ import annotations

import io
import re
from importlib.resources import files
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from bincounter.serving import app as serve
from bincounter.config import ServeConfig, VerdictConfig
from tests.browser import headless_page
from tests.live_server import serving
from tests.width_model import WidthModel

MODEL_URI = "models:/bincounter@champion"


def _app(verdict: VerdictConfig = VerdictConfig(rule="thresholds")):
    # The server includes the page (serve.create_app), with the verdict settings of its config.
    # count = width // 8 with probability 0.7, 0.2 on the next count, 0.025 on each other one:
    # under the rule of the model's probability alone one photo gives a match, an unsure and
    # mismatches. Its metadata gives it count sets: the counts at probability 0.15 or more.
    model = WidthModel(top=0.7, runner_up=0.2)
    model.metadata = SimpleNamespace(metadata={"class_names": [str(c) for c in range(6)], "min_count": 0,
                                               "count_set_threshold": 0.15, "count_set_coverage": 0.9})
    return serve.create_app(ServeConfig(model_uri=MODEL_URI, verdict=verdict), model=model)


def _jpeg(width: int, height: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (180, 140, 90)).save(buf, format="JPEG")
    return buf.getvalue()


def test_the_page_and_its_assets_are_served_with_a_strict_policy():
    with TestClient(_app(VerdictConfig(flag_threshold=0.1, match_threshold=0.6))) as client:
        index = client.get("/")
        assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in index.headers["content-security-policy"]
        assert '<label for="photo">' in index.text and '<label for="expected">' in index.text
        assert client.get("/ui/app.js").headers["content-type"].startswith("text/javascript")
        assert client.get("/ui/style.css").headers["content-type"].startswith("text/css")
        assert client.get("/ui/config.json").json() == {
            "rule": "posterior", "error_rate": 0.05, "off_by_one_share": 0.8, "off_by_more_share": 0.05,
            "flag_threshold": 0.1, "match_threshold": 0.6, "thresholds_from": "the server's settings"}
        assert client.get("/ui/index.py").status_code == 404
        assert client.get("/ui/..%2Fpage.py").status_code == 404
        assert client.get("/healthz").status_code == 200  # the server's own routes are untouched


def test_the_page_needs_nothing_from_the_network():
    for name in ("index.html", "app.js", "style.css"):
        text = (files("bincounter.serving") / "static" / name).read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), f"{name} refers to another host"


# -- in a real browser ---------------------------------------------------------------------


@pytest.fixture
def browser_page():
    """A phone-sized page in headless Debian chromium; skipped when either is missing."""
    with headless_page({"width": 390, "height": 844}) as page:
        yield page


def _bars(tab) -> dict[int, float]:
    return {int(li.get_attribute("data-count")): float(li.get_attribute("data-probability"))
            for li in tab.locator("#bars li").all()}


@pytest.mark.slow
def test_a_person_checks_one_bin_in_a_browser(browser_page, tmp_path):
    photo = tmp_path / "bin.jpg"
    photo.write_bytes(_jpeg(24))  # the model counts 3
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not a photo")
    tab = browser_page
    problems: list[str] = []
    foreign: list[str] = []
    tab.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    tab.on("pageerror", lambda e: problems.append(str(e)))
    with serving(_app()) as url:
        tab.on("request", lambda r: foreign.append(r.url) if not r.url.startswith((url, "blob:", "data:")) else None)
        tab.goto(url + "/")
        assert tab.get_by_label("Bin photo").count() == 1
        assert tab.get_by_label("Expected count (optional)").count() == 1

        tab.get_by_label("Bin photo").set_input_files(str(photo))
        tab.locator("#result:not([hidden])").wait_for()
        assert tab.locator("#count").inner_text() == "3"
        assert tab.locator("#count-set").inner_text() == "The bin holds 3 or 4 items (right 90.0% of the time on " \
                                                         "held-out photos)."
        assert "Type the expected count" in tab.locator("#verdict").inner_text()
        assert "model gives the expected count at most 5.0%" in tab.locator("#rule").inner_text()
        assert tab.locator("#preview").is_visible()

        def check(expected: int) -> str:
            tab.get_by_label("Expected count (optional)").fill(str(expected))
            tab.get_by_role("button", name="Count").click()
            # The page's policy forbids eval, so wait on elements, not on a script: one render
            # marks the expected count's bar and sets the verdict together.
            tab.locator(f"#bars li.expected[data-count='{expected}']").wait_for()
            return tab.locator("#verdict").get_attribute("data-verdict")

        assert check(3) == "match"
        bars = _bars(tab)
        assert bars == pytest.approx({0: 0.025, 1: 0.025, 2: 0.025, 3: 0.7, 4: 0.2, 5: 0.025})
        assert tab.locator("#bars li.predicted").get_attribute("data-count") == "3"
        assert tab.locator("#bars li[data-count='3'] .bar-fill").evaluate("e => e.getBoundingClientRect().width") > \
            tab.locator("#bars li[data-count='4'] .bar-fill").evaluate("e => e.getBoundingClientRect().width") > 0
        assert check(4) == "unsure"
        assert check(1) == "mismatch"
        assert "does not hold 1 item" in tab.locator("#verdict").inner_text()
        # Nothing wider than the phone's screen.
        assert tab.evaluate("document.documentElement.scrollWidth") <= 390
        tab.screenshot(path=str(tmp_path / "page.png"), full_page=True)

        tab.get_by_label("Bin photo").set_input_files(str(broken))
        tab.locator("#error:not([hidden])").wait_for()
        assert "could not be read as a bin photo" in tab.locator("#error").inner_text()
        assert tab.locator("#result").is_hidden()
        assert tab.get_by_label("Bin photo").is_enabled()  # the page still works: count the good photo again
        tab.get_by_label("Bin photo").set_input_files(str(photo))
        tab.locator("#result:not([hidden])").wait_for()
        assert tab.locator("#error").is_hidden()
    assert not foreign, f"the page fetched from elsewhere: {foreign}"
    # A failed POST (the broken photo's 4xx) is logged by the browser itself; nothing else may be.
    assert [p for p in problems if "status of 4" not in p] == []
