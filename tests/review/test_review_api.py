"""The review page's API: who may write, which bin comes next, what is stored, hostile requests."""

from __future__ import annotations

import json
import threading

import pytest
from fastapi.testclient import TestClient

from bincounter.review.app import create_app
from bincounter.review.auth import add_reviewer, read_tokens
from tests.review.floor import EXPECTED, make_floor


@pytest.fixture
def floor(tmp_path):
    return make_floor(tmp_path)


def _answer(client, floor, name: str, id_: str, count: int | None = None, sha: str | None = None):
    body = {"cant_tell": True} if count is None else {"count": count}
    return client.post(f"/api/bins/{id_}/answer", json={**body, "photo_sha256": sha or floor.sha(id_)},
                       headers=floor.auth(name))


def _next(client, floor, name: str) -> str | None:
    answer = client.get("/api/next", headers=floor.auth(name))
    assert answer.status_code == 200
    id_ = answer.json()["id"]
    if id_ is not None:
        assert client.get(f"/api/bins/{id_}/photo", headers=floor.auth(name)).status_code == 200
    return id_


def test_a_missing_or_forged_token_is_refused_and_the_file_keeps_no_token(floor):
    with TestClient(create_app(floor.cfg(), floor.queue)) as client:
        assert client.get("/").status_code == 200  # the page itself holds no data
        for headers in ({}, {"Authorization": "Bearer forged"}, {"Authorization": f"Basic {floor.token['ana']}"},
                        {"Authorization": "Bearer " + "x" * 5000}):
            for method, path in (("GET", "/api/me"), ("GET", "/api/next"), ("GET", "/api/bins/00001/photo"),
                                 ("POST", "/api/bins/00001/skip")):
                assert client.request(method, path, headers=headers).status_code == 401, (headers, path)
            refused = client.post("/api/bins/00001/answer", headers=headers,
                                  json={"count": 3, "photo_sha256": floor.sha("00001")})
            assert refused.status_code == 401
        assert floor.reviews("00001") == []
        me = client.get("/api/me", headers=floor.auth("ana")).json()
        assert me == {"reviewer": "ana", "answered": 0, "remaining": 6, "sign_in": "token"}
    text = floor.tokens.read_text()
    assert all(token not in text for token in floor.token.values())
    assert set(read_tokens(floor.tokens).values()) == {"ana", "bo", "cy"}


def test_a_reviewer_removed_from_the_file_is_refused_at_once(floor):
    with TestClient(create_app(floor.cfg(), floor.queue)) as client:
        assert client.get("/api/me", headers=floor.auth("bo")).status_code == 200
        new = add_reviewer(floor.tokens, "bo")  # a new token for bo: the old one stops working
        assert client.get("/api/me", headers=floor.auth("bo")).status_code == 401
        assert client.get("/api/me", headers={"Authorization": f"Bearer {new}"}).json()["reviewer"] == "bo"


def test_behind_a_proxy_its_identity_header_names_the_reviewer(floor):
    cfg = floor.cfg().model_copy(update={"tokens": None, "identity_header": "X-Forwarded-Email"})
    with TestClient(create_app(cfg, floor.queue)) as client:
        assert client.get("/api/me").status_code == 401
        assert client.get("/api/me", headers={"X-Forwarded-Email": "../../x"}).status_code == 401
        me = client.get("/api/me", headers={"X-Forwarded-Email": "ana@example.com"}).json()
        assert me["reviewer"] == "ana@example.com" and me["sign_in"] == "proxy"
        id_ = client.get("/api/next", headers={"X-Forwarded-Email": "ana@example.com"}).json()["id"]
        client.get(f"/api/bins/{id_}/photo", headers={"X-Forwarded-Email": "ana@example.com"})
        stored = client.post(f"/api/bins/{id_}/answer", headers={"X-Forwarded-Email": "ana@example.com"},
                             json={"count": 2, "photo_sha256": floor.sha(id_)})
        assert stored.status_code == 200
    assert floor.reviews(id_)[0]["reviewer"] == "ana@example.com"


def test_nobody_may_open_the_page_without_a_way_to_sign_in(floor):
    with pytest.raises(ValueError, match="not open to everyone"):
        create_app(floor.cfg().model_copy(update={"tokens": None}), floor.queue)


def test_bins_come_in_queue_order_one_person_each_and_disputes_go_back_first(floor):
    with TestClient(create_app(floor.cfg(), floor.queue)) as client:
        # Two people side by side get different bins (leases), in the queue's order.
        assert _next(client, floor, "ana") == "00001"
        assert _next(client, floor, "bo") == "00002"
        assert _answer(client, floor, "ana", "00001", 3).json() == {"stored": True, "status": "settled", "answered": 1}
        assert _answer(client, floor, "bo", "00002", 1).json()["status"] == "settled"
        # A skipped bin is not handed to the same person again, but is to others.
        assert _next(client, floor, "ana") == "00003"
        assert client.post("/api/bins/00003/skip", headers=floor.auth("ana")).json() == {"skipped": True}
        assert _next(client, floor, "ana") == "00004"
        assert _next(client, floor, "cy") == "00003"
        # bo disagrees on a bin ana counted (answering it directly): it is disputed, and goes to
        # the one person who has not answered it before any fresh bin.
        assert _answer(client, floor, "bo", "00001", 5).json()["status"] == "disputed"
        assert _next(client, floor, "cy") == "00001"
        assert _answer(client, floor, "cy", "00001", 3).json()["status"] == "settled"
        assert _answer(client, floor, "cy", "00003", None).json()["status"] == "open"
        assert client.get("/api/me", headers=floor.auth("cy")).json()["answered"] == 2
    answers = floor.reviews("00001")
    assert [(a["reviewer"], a["count"]) for a in answers] == [("ana", 3), ("bo", 5), ("cy", 3)]
    assert all(a["photo_sha256"] == floor.sha("00001") and a["model"] == "models:/bincounter/7" for a in answers)
    assert floor.reviews("00003")[0]["count"] is None


def test_the_queue_empties_and_a_server_started_later_knows_what_is_settled(floor):
    with TestClient(create_app(floor.cfg(), floor.queue)) as client:
        while (id_ := _next(client, floor, "ana")) is not None:
            assert _answer(client, floor, "ana", id_, 2).status_code == 200
        assert client.get("/api/next", headers=floor.auth("ana")).json() == {"id": None, "remaining": 0}
    with TestClient(create_app(floor.cfg(), floor.queue)) as client:
        assert client.get("/api/me", headers=floor.auth("bo")).json()["remaining"] == 0
        assert client.get("/api/next", headers=floor.auth("bo")).json()["id"] is None


def test_nothing_the_person_could_anchor_on_is_sent(floor):
    with TestClient(create_app(floor.cfg(), floor.queue)) as client:
        seen = [client.get("/", headers=floor.auth("ana")).text, client.get("/ui/review.js").text]
        for path in ("/api/me", "/api/next"):
            seen.append(client.get(path, headers=floor.auth("ana")).text)
        photo = client.get("/api/bins/00001/photo", headers=floor.auth("ana"))
        seen.append(json.dumps(dict(photo.headers)))
        assert all(str(EXPECTED) not in text and "uncertainty" not in text for text in seen)


def test_hostile_answers_are_refused_and_store_nothing(floor):
    with TestClient(create_app(floor.cfg(max_count=50), floor.queue)) as client:
        ana = floor.auth("ana")
        sha = floor.sha("00001")
        cases = [
            ({"count": -1, "photo_sha256": sha}, 422), ({"count": 51, "photo_sha256": sha}, 422),
            ({"count": "3", "photo_sha256": sha}, 422), ({"count": 2.5, "photo_sha256": sha}, 422),
            ({"count": True, "photo_sha256": sha}, 422), ({"count": 3}, 422),
            ({"count": 3, "cant_tell": True, "photo_sha256": sha}, 422), ({"photo_sha256": sha}, 422),
            ({"count": 3, "photo_sha256": sha, "reviewer": "bo"}, 422),  # nobody answers for another
            ({"count": 3, "photo_sha256": "f" * 64}, 409),  # not the photo the server shows
        ]
        for body, status in cases:
            assert client.post("/api/bins/00001/answer", json=body, headers=ana).status_code == status, body
        assert client.post("/api/bins/00001/answer", content="count=3", headers={
            **ana, "Content-Type": "application/x-www-form-urlencoded"}).status_code == 415
        big = '{"count": 3, "photo_sha256": "' + "a" * 10_000 + '"}'
        assert client.post("/api/bins/00001/answer", content=big, headers={
            **ana, "Content-Type": "application/json"}).status_code == 413
        for id_ in ("99999", "..%2F..%2Fetc", "00001.json", "1e3"):
            assert client.get(f"/api/bins/{id_}/photo", headers=ana).status_code == 404
            assert client.post(f"/api/bins/{id_}/answer", json={"count": 1, "photo_sha256": sha},
                               headers=ana).status_code == 404
        assert client.get("/ui/../app.py").status_code == 404
    assert floor.reviews("00001") == []
    assert not (floor.root / "reviews").exists() or not list((floor.root / "reviews").glob("*.json"))


def test_a_photo_replaced_since_it_was_shown_is_not_answered_for(floor):
    with TestClient(create_app(floor.cfg(), floor.queue)) as client:
        assert _next(client, floor, "ana") == "00001"
        shown = floor.sha("00001")
        (floor.root / "bin-images" / "00001.jpg").write_bytes((floor.root / "bin-images" / "00002.jpg").read_bytes())
        client.get("/api/bins/00001/photo", headers=floor.auth("bo"))  # the server now shows the new one
        refused = _answer(client, floor, "ana", "00001", 3, sha=shown)
        assert refused.status_code == 409 and "changed" in refused.json()["detail"]
    assert floor.reviews("00001") == []


def test_a_bin_whose_reviews_file_is_not_ours_leaves_the_queue_untouched(floor):
    (floor.root / "reviews").mkdir()
    (floor.root / "reviews" / "00001.json").write_text('{"id": "00001", "answers": "overwrite me"}')
    with TestClient(create_app(floor.cfg(), floor.queue)) as client:
        assert _next(client, floor, "ana") == "00002"
        assert _answer(client, floor, "ana", "00001", 3).status_code == 404
        assert client.get("/api/me", headers=floor.auth("ana")).json()["remaining"] == 5
    assert json.loads((floor.root / "reviews" / "00001.json").read_text())["answers"] == "overwrite me"


def test_concurrent_reviewers_on_one_bin_both_land(floor):
    with TestClient(create_app(floor.cfg(), floor.queue)) as client:
        client.get("/api/bins/00004/photo", headers=floor.auth("ana"))
        barrier = threading.Barrier(3)
        results = {}

        def answer(name: str, count: int) -> None:
            barrier.wait()
            results[name] = _answer(client, floor, name, "00004", count).status_code

        threads = [threading.Thread(target=answer, args=(n, c)) for n, c in (("ana", 2), ("bo", 3), ("cy", 2))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == {"ana": 200, "bo": 200, "cy": 200}
    assert sorted((a["reviewer"], a["count"]) for a in floor.reviews("00004")) == [("ana", 2), ("bo", 3), ("cy", 2)]
