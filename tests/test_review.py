"""The review page on a real run: decisions (append-only, latest wins, auto rules), the token / CSRF / path
guards of a real uvicorn server, two reviewer processes at once, and keyboard review in headless Chromium."""

from __future__ import annotations

import datetime as dt
import http.client
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import uvicorn
from conftest import _free_port
from PIL import Image
from promptmill.jobs.cli import main as cli
from promptmill.pipelines.review.app import build_app
from promptmill.pipelines.review.decisions import DecisionLog, best_per_group, decision_table, latest
from promptmill.pipelines.review.grid import Grid
from promptmill.pipelines.storage import filesystem
from review_runs import ad_run, copy_run

T0 = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def made_run(ray_local, checkpoints, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("review")
    return Path(ad_run(tmp, checkpoints, str(tmp / "run")))


@pytest.fixture
def run(made_run, tmp_path) -> Path:
    """A private copy of the module's run: each test writes its own decisions."""
    return copy_run(made_run, tmp_path / "run")


@contextmanager
def serving(url: str, token: str = "tok", reviewer: str = "alice"):
    """The review app on a real uvicorn server in a thread; yields its base URL."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(Grid(url), token, reviewer), host="127.0.0.1", port=port,
                                           log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline and th.is_alive(), "the review server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        th.join(10)


def request(base: str, path: str, method: str = "GET", body: dict | None = None, **headers) -> tuple[int, dict, bytes]:
    """A raw request (the path goes out as written: no client-side normalisation of '..')."""
    host, port = base.removeprefix("http://").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    data = json.dumps(body).encode() if body is not None else None
    if data is not None:
        headers.setdefault("Content-Type", "application/json")
    c.request(method, path, body=data, headers={k.replace("_", "-"): v for k, v in headers.items()})
    r = c.getresponse()
    out = (r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    c.close()
    return out


def csrf_of(base: str, token: str = "tok") -> str:
    page = request(base, "/", Authorization=f"Bearer {token}")[2].decode()
    return page.split('name=csrf content="', 1)[1].split('"', 1)[0]


# ---------------------------------------------------------------- decisions


def test_the_latest_decision_wins_and_clear_undecides():
    keys = pa.table({"model": ["m", "m", "m"], "id": ["a", "b", "c"], "sample": [0, 0, 1]})
    d = pa.concat_tables([decision_table(keys, "approve", None, "alice", T0),
                          decision_table(keys.slice(0, 1), "reject", "off-brand", "bob", T0 + dt.timedelta(seconds=1)),
                          decision_table(keys.slice(2, 1), "clear", None, "bob", T0 + dt.timedelta(seconds=1)),
                          decision_table(keys.slice(1, 1), "reject", "late", "bob", T0 - dt.timedelta(seconds=1))])
    got = {(r["id"], r["decision"], r["reviewer"], r["reason"]) for r in latest(d).to_pylist()}
    assert got == {("a", "reject", "bob", "off-brand"), ("b", "approve", "alice", None)}  # c: cleared
    with pytest.raises(ValueError, match="decision 'maybe'"):
        decision_table(keys, "maybe", None, "alice")
    with pytest.raises(ValueError, match="reviewer"):
        decision_table(keys, "approve", None, " ")


def test_best_per_product_skips_flags_nulls_and_rejected():
    md = pa.table({"model": ["m"] * 7, "id": list("abcdefg"), "sample": [0] * 7,
                   "sku": ["x", "x", "x", "y", "y", "y", "z"], "clip_score": [9.0, 8.0, 7.0, 9.0, 5.0, None, 1.0],
                   "near_duplicate": [True, False, False, False, False, False, None], "nsfw": [None] * 7})
    best = best_per_group(md, 1, "clip_score", "sku")
    assert best["id"].to_pylist() == ["b", "d", "g"]  # a: near-duplicate; f: no score
    rejected = pa.table({"model": ["m"], "id": ["d"], "sample": pa.array([0], pa.int32())})
    assert best_per_group(md, 2, "clip_score", "sku", exclude=rejected)["id"].to_pylist() == ["b", "c", "e", "g"]
    with pytest.raises(ValueError, match="'product'"):
        best_per_group(md, 1, "clip_score", "product")


# ---------------------------------------------------------------- the server's guards


def test_token_csrf_and_no_path_outside_the_run(run):
    with serving(str(run)) as base:
        # no token, a wrong one (query, header, cookie): 401 on every route, the page and images included
        for path in ("/", "/api/meta", "/api/items", "/img/gan/p0/0", "/static/review.js", "/nope"):
            assert request(base, path)[0] == 401, path
            assert request(base, path + "?token=wrong")[0] == 401, path
        assert request(base, "/api/meta", Authorization="Bearer wrong")[0] == 401
        assert request(base, "/api/meta", Cookie="promptmill_review_x=tok")[0] == 401
        # the printed URL's ?token= sets an HttpOnly SameSite=Strict cookie and redirects to a clean URL
        status, headers, _ = request(base, "/?token=tok")
        assert status == 303 and "token" not in headers["location"]
        cookie = headers["set-cookie"]
        assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
        jar = cookie.split(";", 1)[0]
        status, headers, page = request(base, "/", Cookie=jar)
        assert status == 200 and b"review.js" in page and "default-src 'self'" in headers["content-security-policy"]
        auth = {"Authorization": "Bearer tok"}
        # images by key only; a path in the request never reaches storage
        status, headers, png = request(base, "/img/gan/p0/0", **auth)
        assert status == 200 and Image.open(io.BytesIO(png)).size == (192, 192)  # 32 px upscaled, pixels kept
        assert "max-age" in headers["cache-control"]
        assert request(base, "/img/gan/p0/0", **auth, If_None_Match=headers["etag"])[0] == 304
        for path in ("/img/gan/p0/7", "/img/nope/p0/0", "/img/../../../../etc/passwd", "/img/gan/p0/0/../../../summary.json",
                     "/static/..%2F..%2Fapp.py", "/static/../app.py", "/static/review.html", "/summary.json",
                     "/metadata/", "/img/gan/..%2F..%2Fsummary.json/0"):
            assert request(base, path, **auth)[0] == 404, path
        # metadata is anyone's to edit: an image_path pointing out of the run is not read, and is a 404
        part = next((run / "metadata").glob("*.parquet"))
        t = pq.read_table(part)
        paths = t["image_path"].to_pylist()
        paths[0] = "/etc/hostname"
        pq.write_table(t.set_column(t.column_names.index("image_path"), "image_path", pa.array(paths)), part)
    first = pq.read_table(part).slice(0, 1).to_pylist()[0]
    with serving(str(run)) as base:
        assert request(base, f"/img/{first['model']}/{first['id']}/{first['sample']}", **auth)[0] == 404
        # POSTs: CSRF header, this server's Origin, JSON; GET is not allowed
        item = {"items": [{"model": "gan", "id": "p1", "sample": 0}], "decision": "approve"}
        assert request(base, "/api/decide", "POST", item, **auth)[0] == 403
        csrf = csrf_of(base)
        assert request(base, "/api/decide", "POST", item, **auth, X_CSRF_Token="0" * 64)[0] == 403
        assert request(base, "/api/decide", "POST", item, **auth, X_CSRF_Token=csrf, Origin="http://evil.example")[0] == 403
        assert request(base, "/api/decide", **auth)[0] == 405
        assert not (run / "reviews").exists()
        ok = dict(auth, X_CSRF_Token=csrf, Origin=base)
        assert request(base, "/api/decide", "POST", item, **ok)[0] == 200
        missing = {"items": [{"model": "gan", "id": "nope", "sample": 0}], "decision": "approve"}
        status, _, body = request(base, "/api/decide", "POST", missing, **ok)
        assert status == 404 and b"gan/nope/0" in body
        assert request(base, "/api/decide", "POST", dict(item, decision="maybe"), **ok)[0] == 400
        status, _, body = request(base, "/api/items?min_score=high", **auth)
        assert status == 400 and b"min_score" in body
        # bulk: the best 1 per sku by clip_score
        status, _, body = request(base, "/api/bulk", "POST", {"n": 1, "score": "clip_score"}, **ok)
        assert status == 200 and json.loads(body)["written"] == 2
        approved = json.loads(request(base, "/api/items?decision=approve&sort=score_desc", **auth)[2])
    md = pq.read_table(run / "metadata").to_pylist()
    best = {sku: max((r for r in md if r["sku"] == sku and not r["near_duplicate"]), key=lambda r: r["clip_score"])
            for sku in ("s1", "s2")}
    shown = {(r["id"], r["sample"]) for r in approved["rows"]}
    assert {(b["id"], b["sample"]) for b in best.values()} <= shown and ("p1", 0) in shown
    assert all(r["decision"]["reviewer"] == "alice" and r["kept"]["campaign"] == "spring" for r in approved["rows"])


def test_report_links_to_the_review_page(run):
    assert cli(["report", str(run), "--review-url", "http://127.0.0.1:8765/"]) == 0
    assert "<a id=review href='http://127.0.0.1:8765/'>" in (run / "report.html").read_text()


# ---------------------------------------------------------------- two reviewers at once


def _start_reviewer(run: Path, name: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = dict(os.environ, PROMPTMILL_REVIEW_TOKEN=f"token-{name}", PROMPTMILL_REVIEWER=name)
    p = subprocess.Popen([sys.executable, "-m", "promptmill.jobs.cli", "review", str(run), "--port", str(port)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:  # the printed URL carries the token, as Jupyter's does
        if "?token=" in line:
            assert line.strip() == f"http://127.0.0.1:{port}/?token=token-{name}"
            return p, f"http://127.0.0.1:{port}"
    raise AssertionError(f"reviewer {name} did not start: {p.wait()}")


def test_review_binds_loopback_with_a_random_token(run):
    env = {k: v for k, v in os.environ.items() if k != "PROMPTMILL_REVIEW_TOKEN"}
    p = subprocess.Popen([sys.executable, "-m", "promptmill.jobs.cli", "review", str(run), "--port", "0"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = next(line.strip() for line in p.stdout if "?token=" in line)
        base, token = url.split("/?token=")
        assert base.startswith("http://127.0.0.1:") and len(token) >= 32  # secrets.token_urlsafe(24)
        assert request(base, "/api/meta")[0] == 401
        assert json.loads(request(base, "/api/meta", Authorization=f"Bearer {token}")[2])["rows"] == 8
    finally:
        p.terminate()
        p.wait(10)


def test_two_reviewer_processes_lose_nothing(run):
    procs = [_start_reviewer(run, n) for n in ("alice", "bob")]
    try:
        keys = [{"model": "gan", "id": f"p{i}", "sample": s} for i in range(4) for s in range(2)]
        errors = []

        def review(base: str, name: str) -> None:
            csrf = csrf_of(base, f"token-{name}")
            for round_ in range(4):
                for k in keys:
                    decision = "approve" if (round_ + (name == "bob")) % 2 else "reject"
                    status, _, body = request(base, "/api/decide", "POST", {"items": [k], "decision": decision,
                                              "reason": None if decision == "approve" else f"{name} {round_}"},
                                              Authorization=f"Bearer token-{name}", X_CSRF_Token=csrf)
                    if status != 200:
                        errors.append(body)

        threads = [threading.Thread(target=review, args=(base, n)) for (_, base), n in zip(procs, ("alice", "bob"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors
        fs, root = filesystem(str(run))
        every = DecisionLog(fs, root).refresh()
        assert len(every) == 2 * 4 * 8  # every decision of both, none lost
        assert len(list((run / "reviews").glob("part-*.parquet"))) == 64
        assert sorted(set(every["reviewer"].to_pylist())) == ["alice", "bob"]
        final = latest(every).sort_by([("id", "ascending"), ("sample", "ascending")])
        expected = []
        for k in keys:
            mine = every.filter(pc.and_(pc.equal(every["id"], k["id"]), pc.equal(every["sample"], k["sample"])))
            expected.append(mine.sort_by([("time", "ascending")]).slice(len(mine) - 1).to_pylist()[0]["reviewer"])
        assert final["reviewer"].to_pylist() == expected  # the latest by time wins, whoever wrote it
        # each page shows the other's decisions: who decided what
        rows = json.loads(request(procs[0][1], "/api/items?sort=key", Authorization="Bearer token-alice")[2])["rows"]
        assert [r["decision"]["reviewer"] for r in rows] == expected
    finally:
        for p, _ in procs:
            p.terminate()
            p.wait(10)
    # a reviewer restarting the app sees it all
    assert latest(DecisionLog(*filesystem(str(run))).refresh()).equals(final.sort_by([("model", "ascending"),
                                                                                      ("id", "ascending"),
                                                                                      ("sample", "ascending")]))


# ---------------------------------------------------------------- in a real browser


def test_keyboard_review_in_headless_chromium(run):
    from playwright.sync_api import expect, sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "a headless Chromium is part of the test set-up: run `make chromium`"
    with serving(str(run)) as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{base}/?token=tok")
            assert "token" not in page.url  # redirected to a clean URL, the cookie holds the token
            cards = page.locator(".card")
            expect(cards).to_have_count(8)
            order = [cards.nth(i).get_attribute("data-key") for i in range(8)]
            scores = json.loads(request(base, "/api/items?sort=score_desc", Authorization="Bearer tok")[2])["rows"]
            assert order == [f"{r['model']}/{r['id']}/{r['sample']}" for r in scores]  # best first
            expect(cards.nth(0)).to_have_class("card sel")
            expect(cards.nth(0).locator("img")).to_have_js_property("complete", True)  # (the page's CSP forbids eval)
            assert cards.nth(0).locator("img").evaluate("i => i.naturalWidth") == 192  # the thumbnail, served by key
            page.keyboard.press("a")  # approve #0, move to #1
            expect(cards.nth(0)).to_have_attribute("data-decision", "approve")
            page.keyboard.press("r")  # reject #1 with the first listed reason
            expect(page.locator("#reason")).to_be_visible()
            page.keyboard.press("1")
            expect(cards.nth(1)).to_have_attribute("data-decision", "reject")
            page.keyboard.press("j")  # skip #2
            page.keyboard.press("r")  # reject #3 with a typed reason
            page.keyboard.type("logo too small")
            page.keyboard.press("Enter")
            expect(cards.nth(3)).to_have_attribute("data-decision", "reject")
            page.keyboard.press("a")  # approve #4, then undo it
            expect(cards.nth(4)).to_have_attribute("data-decision", "approve")
            page.keyboard.press("u")
            expect(cards.nth(4)).to_have_attribute("data-decision", "none")
            page.keyboard.press("k")
            expect(cards.nth(3)).to_have_class("card sel")
            page.keyboard.press("?")
            expect(page.locator("#help")).to_be_visible()
            page.keyboard.press("Escape")
            expect(page.locator("#help")).to_be_hidden()
            if os.environ.get("PROMPTMILL_SCREENSHOT"):  # the README's picture: PROMPTMILL_SCREENSHOT=docs/review.png
                page.evaluate("window.scrollTo(0, 0)")
                page.screenshot(path=os.environ["PROMPTMILL_SCREENSHOT"])
            page.reload()
            expect(cards).to_have_count(8)
            decided = {cards.nth(i).get_attribute("data-key"): cards.nth(i).get_attribute("data-decision") for i in range(8)}
            assert decided == {order[0]: "approve", order[1]: "reject", order[3]: "reject",
                               **{k: "none" for k in order if k not in (order[0], order[1], order[3])}}
            expect(cards.nth(1).locator(".verdict")).to_have_text("\u2717 rejected (off-brand) by alice")
            expect(cards.nth(3).locator(".verdict")).to_have_text("\u2717 rejected (logo too small) by alice")
            page.select_option("select[name=decision]", "approve")  # filter by decision
            expect(cards).to_have_count(1)
            page.select_option("select[name=decision]", "")
            page.select_option("select[name=sku]", "s2")  # by a kept column
            expect(cards).to_have_count(4)
        finally:
            browser.close()
    # the Parquet: every keystroke's decision appended, the latest in force
    every = pq.read_table(run / "reviews")
    assert sorted(every["decision"].to_pylist()) == ["approve", "approve", "clear", "reject", "reject"]
    assert set(every["reviewer"].to_pylist()) == {"alice"}
    now = {f"{r['model']}/{r['id']}/{r['sample']}": (r["decision"], r["reason"]) for r in latest(every).to_pylist()}
    assert now == {order[0]: ("approve", None), order[1]: ("reject", "off-brand"), order[3]: ("reject", "logo too small")}
