"""The review page (bincounter/review/static): its files, and a person counting a queue in a
real headless browser against the real review app, answers landing in reviews/<id>.json."""

from __future__ import annotations

import hashlib
import re
import urllib.request
from importlib.resources import files

import pytest

from bincounter.review import app as review
from tests.browser import headless_page
from tests.review.floor import EXPECTED, make_floor
from tests.review.floor import photo as bin_photo
from tests.live_server import serving

STATIC = ("index.html", "review.js", "review.css")
MODEL = "counter-v7"
IDS = ["00101", "00102", "00103", "00104", "00105", "00106"]
PHONE = {"width": 390, "height": 844}


def _static(name: str) -> str:
    return (files("bincounter.review") / "static" / name).read_text()


# -- the files ---------------------------------------------------------------------------------


def test_the_page_is_self_contained_and_fits_its_policy():
    html, js, css = (_static(name) for name in STATIC)
    for name, text in zip(STATIC, (html, js, css)):
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.IGNORECASE), f"{name} refers to another host"
    # Relative references only, so the page works behind a path prefix.
    assert '<script src="ui/review.js" defer></script>' in html
    assert '<link rel="stylesheet" href="ui/review.css">' in html
    assert not re.search(r"""(src|href)=["']/""", html)
    assert not re.search(r"""fetch\(\s*["'`]/""", js) and '"api/"' in js
    # The policy forbids inline scripts, inline styles and eval.
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "an inline script"
    assert "<style" not in html and not re.search(r"\sstyle=", html) and not re.search(r"\son[a-z]+=", html)
    assert not re.search(r"\beval\(|new Function|setTimeout\(\s*[\"'`]|innerHTML", js)
    for id_ in ("signin", "token", "photo", "bin-id", "count", "progress", "error", "done"):
        assert f'id="{id_}"' in html, id_
    assert '<label for="token">Reviewer token</label>' in html and 'type="password"' in html
    assert 'id="progress" class="progress" role="status"' in html and 'id="error" class="error" role="alert"' in html


def test_the_app_serves_the_page_with_a_strict_policy(tmp_path):
    from fastapi.testclient import TestClient

    floor = make_floor(tmp_path, ids=IDS, reviewers=("ana",), model=MODEL)
    with TestClient(review.create_app(floor.cfg(), floor.queue)) as client:
        index = client.get("/")
        assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
        policy = index.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "script-src 'self'" in policy and "style-src 'self'" in policy
        assert index.text == _static("index.html")
        assert client.get("/ui/review.js").headers["content-type"].startswith("text/javascript")
        assert client.get("/ui/review.css").headers["content-type"].startswith("text/css")
        assert client.get("/ui/review.js").text == _static("review.js")


# -- in a real browser -----------------------------------------------------------------------------


@pytest.fixture
def browser_page():
    """A phone-sized page in headless Debian chromium; skipped when either is missing."""
    with headless_page(PHONE) as page:
        yield page


@pytest.mark.slow
def test_a_person_counts_the_queue_in_a_browser(browser_page, tmp_path):
    from playwright.sync_api import expect

    floor = make_floor(tmp_path, ids=IDS, reviewers=("ana", "bob"), model=MODEL)
    root, ana, bob = floor.root, floor.token["ana"], floor.token["bob"]
    photos = {id_: floor.photo(id_) for id_ in IDS}
    app = review.create_app(floor.cfg(), floor.queue)

    tab = browser_page
    problems: list[str] = []
    foreign: list[str] = []
    api_responses = []
    tab.on("console", lambda m: problems.append((m.text, m.location.get("url", ""))) if m.type == "error" else None)
    tab.on("pageerror", lambda e: problems.append((str(e), "")))
    tab.on("response", lambda r: api_responses.append(r) if "/api/" in r.url else None)

    def button(name: str):
        return tab.get_by_role("button", name=name, exact=True)

    count = tab.locator("#count")
    save = button("Save count")

    def never_anchored():
        html = tab.content()
        assert str(EXPECTED) not in html and str(EXPECTED) not in tab.locator("body").inner_text()

    def fits_the_phone():
        assert tab.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        for b in tab.get_by_role("button").all():
            if b.is_visible():
                box = b.bounding_box()
                assert box["height"] >= 44, (b.inner_text(), box)
                assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], (b.inner_text(), box)

    def on_bin(id_: str):
        """Wait until bin ``id_``'s photo is shown and the page takes an answer."""
        expect(tab.locator(f"#photo[alt='Bin {id_}']")).to_be_visible()
        expect(save).to_be_enabled()
        expect(tab.locator("#bin-id")).to_have_text(id_)
        expect(count).to_have_text("")
        never_anchored()

    with serving(app) as url:
        tab.on("request", lambda r: foreign.append(r.url) if not r.url.startswith((url, "blob:", "data:")) else None)
        tab.goto(url + "/")

        # Signing in: no token yet, so the form; a wrong token is refused and the form stays.
        expect(tab.locator("#signin")).to_be_visible()
        tab.screenshot(path=str(tmp_path / "signin.png"), full_page=True)
        token = tab.get_by_label("Reviewer token", exact=True)
        assert token.get_attribute("type") == "password"
        assert tab.locator("#work").is_hidden()
        fits_the_phone()
        token.fill("not-a-token")
        button("Sign in").click()
        expect(tab.locator("#error")).to_contain_text("That token was refused")
        assert tab.locator("#error").get_attribute("role") == "alert"
        expect(tab.locator("#signin")).to_be_visible()
        assert tab.evaluate("sessionStorage.length") == 0
        token.fill(ana)
        token.press("Enter")  # digits and Enter in the token field are the field's, not shortcuts
        expect(tab.get_by_text("Signed in as ana")).to_be_visible()
        expect(tab.locator("#signin")).to_be_hidden()
        expect(tab.locator("#error")).to_be_hidden()
        expect(button("Sign out")).to_be_visible()

        # Bin 1, by mouse: 1 2 ⌫ 3 is 13.
        on_bin("00101")
        expect(tab.locator("#progress")).to_have_text("You counted 0 · 6 left in the queue")
        assert tab.locator("#progress").get_attribute("role") == "status"
        assert tab.get_by_label("Count", exact=True).count() == 1
        fits_the_phone()
        ones, twos, threes = (button(d).bounding_box() for d in "123")
        assert ones["y"] == twos["y"] == threes["y"] and ones["x"] < twos["x"] < threes["x"]  # three columns
        assert button("4").bounding_box()["y"] > ones["y"]
        photo_box = tab.locator("#photo").bounding_box()
        assert photo_box["width"] >= PHONE["width"] - 40  # full width on a phone
        tab.screenshot(path=str(tmp_path / "phone.png"), full_page=True)
        button("1").click()
        button("2").click()
        tab.get_by_role("button", name="Delete last digit").click()
        button("3").click()
        expect(count).to_have_text("13")
        save.click()

        # Bin 2, by keyboard: five digits are four, Backspace deletes, Enter saves (twice: one answer).
        on_bin("00102")
        expect(tab.locator("#progress")).to_have_text("You counted 1 · 5 left in the queue")
        tab.keyboard.type("12345")
        expect(count).to_have_text("1234")
        expect(tab.locator("#notice")).to_contain_text("at most 4 digits")
        for _ in range(3):
            tab.keyboard.press("Backspace")
        tab.keyboard.type("1")
        expect(count).to_have_text("11")
        tab.keyboard.press("Enter")
        tab.keyboard.press("Enter")

        # Bin 3: Enter with no count only says so; C says can't tell.
        on_bin("00103")
        tab.keyboard.press("Enter")
        expect(tab.locator("#notice")).to_contain_text("Type the count first")
        assert tab.locator("#bin-id").inner_text() == "00103" and not floor.reviews("00103")
        tab.keyboard.press("c")

        # Bin 4: S skips it.
        on_bin("00104")
        expect(tab.locator("#progress")).to_have_text("You counted 3 · 4 left in the queue")  # 00103 stays open
        tab.keyboard.press("s")

        # Bin 5, on a wide screen: the photo takes most of the height. The first save fails on the
        # network: the error shows, the bin and the typed count stay, and saving again works.
        on_bin("00105")
        tab.set_viewport_size({"width": 1280, "height": 800})
        assert tab.locator("#photo").bounding_box()["height"] >= 0.6 * 800
        pad = tab.locator(".pad").bounding_box()
        assert pad["x"] > tab.locator("#photo").bounding_box()["x"]  # the pad beside the photo
        tab.screenshot(path=str(tmp_path / "desktop.png"))
        tab.set_viewport_size(PHONE)
        button("0").click()
        tab.keyboard.type("5")
        expect(count).to_have_text("5")
        tab.route("**/api/bins/00105/answer", lambda route: route.abort())
        save.click()
        expect(tab.locator("#error")).to_contain_text("server could not be reached")
        expect(save).to_be_enabled()
        assert count.inner_text() == "5" and tab.locator("#bin-id").inner_text() == "00105"
        assert not floor.reviews("00105")
        tab.unroute("**/api/bins/00105/answer")
        save.click()

        # Bin 6: its photo is replaced, and someone else loads the new one, before ana saves: her
        # answer is refused (409), the page says so and hands her the bin again, new photo.
        on_bin("00106")
        expect(tab.locator("#error")).to_be_hidden()
        new_photo = bin_photo(42)
        (root / "bin-images" / "00106.jpg").write_bytes(new_photo)
        request = urllib.request.Request(url + "/api/bins/00106/photo", headers={"Authorization": f"Bearer {bob}"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.headers["X-Photo-Sha256"] == hashlib.sha256(new_photo).hexdigest()
        tab.keyboard.type("8")
        tab.keyboard.press("Enter")
        expect(tab.locator("#notice")).to_contain_text("photo changed")
        on_bin("00106")
        assert not floor.reviews("00106")
        tab.keyboard.type("9")
        tab.keyboard.press("Enter")

        # Nothing left for ana.
        expect(tab.locator("#done")).to_contain_text("Nothing left to count. Thank you.")
        expect(tab.locator("#work")).to_be_hidden()
        expect(tab.locator("#photo")).to_be_hidden()
        never_anchored()
        fits_the_phone()
        tab.screenshot(path=str(tmp_path / "done.png"), full_page=True)

        # Signing out forgets the token: the form again.
        button("Sign out").click()
        expect(tab.locator("#signin")).to_be_visible()
        assert tab.evaluate("sessionStorage.length") == 0

        bodies = [r.body() for r in api_responses if "/photo" not in r.url]

    # The answers, as stored: who, what, on which photo, for which model.
    stored = {id_: floor.reviews(id_) for id_ in IDS}
    assert {id_: [a["count"] for a in answers] for id_, answers in stored.items()} == {
        "00101": [13], "00102": [11], "00103": [None], "00104": [], "00105": [5], "00106": [9]}
    for id_, answers in stored.items():
        for a in answers:
            photo = new_photo if id_ == "00106" else photos[id_]
            assert a["reviewer"] == "ana" and a["model"] == MODEL
            assert a["photo_sha256"] == hashlib.sha256(photo).hexdigest()
    # Nothing the page was sent holds the expected count.
    assert bodies and not [b for b in bodies if str(EXPECTED).encode() in b]
    assert not foreign, f"the page fetched from elsewhere: {foreign}"
    # The browser itself logs the refused sign-ins (401), the refused answer (409), the aborted
    # save; nothing else may be logged (the favicon the browser asks for is answered with 204).
    logged = {(re.sub(r"^Failed to load resource: ", "", text), where.removeprefix(url)) for text, where in problems}
    assert logged == {
        ("the server responded with a status of 401 (Unauthorized)", "/api/me"),
        ("net::ERR_FAILED", "/api/bins/00105/answer"),
        ("the server responded with a status of 409 (Conflict)", "/api/bins/00106/answer"),
    }, logged


@pytest.mark.slow
def test_behind_an_authenticating_proxy_there_is_no_form(browser_page, tmp_path):
    """The proxy names the person (its identity header): no token, no form, no sign-out; a server
    error or a refused count keeps the bin and the count for another try."""
    from playwright.sync_api import expect

    floor = make_floor(tmp_path, ids=IDS, reviewers=(), model=MODEL)
    photos = {id_: floor.photo(id_) for id_ in IDS}
    cfg = floor.cfg(tokens=None, identity_header="X-Forwarded-Email")
    app = review.create_app(cfg, floor.queue)
    tab = browser_page
    tab.set_extra_http_headers({"X-Forwarded-Email": "bob@example.org"})
    save = tab.get_by_role("button", name="Save count", exact=True)
    with serving(app) as url:
        tab.goto(url + "/")
        expect(tab.locator("#photo[alt='Bin 00101']")).to_be_visible()
        expect(tab.get_by_text("Signed in as bob@example.org")).to_be_visible()
        assert tab.locator("#signin").is_hidden() and tab.get_by_role("button", name="Sign out").count() == 0
        expect(save).to_be_enabled()

        tab.route("**/api/bins/*/answer", lambda route: route.fulfill(
            status=503, content_type="application/json", body='{"detail": "the store is down"}'))
        tab.keyboard.type("6")
        tab.keyboard.press("Enter")
        expect(tab.locator("#error")).to_contain_text("Not saved (503: the store is down)")
        expect(save).to_be_enabled()
        assert tab.locator("#count").inner_text() == "6" and tab.locator("#bin-id").inner_text() == "00101"
        tab.unroute("**/api/bins/*/answer")

        tab.keyboard.type("999")  # 6999: more than the server takes (max_count)
        tab.keyboard.press("Enter")
        expect(tab.locator("#error")).to_contain_text(f"a count is at most {cfg.max_count}")
        assert tab.locator("#count").inner_text() == "6999"
        for _ in range(3):
            tab.keyboard.press("Backspace")
        tab.keyboard.press("Enter")
        expect(tab.locator("#photo[alt='Bin 00102']")).to_be_visible()
        expect(tab.locator("#error")).to_be_hidden()
    [stored] = floor.reviews("00101")
    assert stored["reviewer"] == "bob@example.org" and stored["count"] == 6
    assert stored["photo_sha256"] == hashlib.sha256(photos["00101"]).hexdigest()
