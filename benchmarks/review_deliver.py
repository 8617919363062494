"""The review page on a 100k-image run (open, page turns) and `deliver`'s images per second per placement.

Page: a synthetic run's metadata, 100,000 rows in 10 committed parts sized like a scored run's (128 judge features,
prompts, scores, flags, kept columns sku / template / campaign over 2,000 products) plus 2,000 decisions in 200
review parts; no images are needed (thumbnails are fetched per card, by key). Timed through a real uvicorn server
over HTTP: open = the app reading the run + GET /api/meta + the first page; a page turn = GET /api/items at
another offset (with no filter, a kept-column filter, a score range, and the undecided-only filter).

Deliver: a real run of the shipped GAN (`promptmill generate`, N images, scoring off), every image approved, then
`deliver` to a fresh folder once per placement and format; images/s = approved images / wall seconds.

Browser: the same page in Debian's headless Chromium (Playwright): navigation to 48 cards drawn, and `n` to the
next page drawn.

    python benchmarks/review_deliver.py [--rows 100000] [--images 300] [--no-browser] [--skip-deliver]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
COLOURS = ["red", "green", "blue", "yellow", "purple", "black", "white", "gray"]
SHAPES = ["circle", "square", "triangle", "diamond"]


def synth_run(root: Path, n: int, decisions: int) -> None:
    from promptmill.pipelines.layout import METADATA_SCHEMA
    from promptmill.pipelines.review.decisions import DecisionLog, decision_table
    from promptmill.pipelines.storage import filesystem

    rng = np.random.default_rng(0)
    (root / "metadata").mkdir(parents=True)
    per = n // 10
    for part in range(10):
        k, base = per, part * per
        ids = [f"sku{(base + i) // 50:05d}-t{(base + i) // 2 % 5}x{(base + i) // 10}" for i in range(k)]
        cols = {f.name: pa.nulls(k, f.type) for f in METADATA_SCHEMA}
        cols.update(id=pa.array(ids), sample=pa.array([(base + i) % 2 for i in range(k)], pa.int32()),
                    model=pa.array(["gan"] * k), prompt=pa.array([f"a small {COLOURS[i % 8]} {SHAPES[i % 4]} on the left, "
                                                                  f"product {(base + i) // 50}" for i in range(k)]),
                    image_path=pa.array([f"{root}/images/gan/abc/{i}-{(base + j) % 2}.png" for j, i in enumerate(ids)]),
                    image_format=pa.array(["png"] * k), width=pa.array([1024] * k, pa.int32()),
                    height=pa.array([1024] * k, pa.int32()), sha256=pa.array(["f" * 64] * k),
                    clip_score=pa.array(rng.uniform(10, 40, k)), aesthetic_score=pa.array(rng.uniform(3, 8, k)),
                    near_duplicate=pa.array(rng.random(k) < 0.05), nsfw=pa.array(rng.random(k) < 0.01),
                    judge_features=pa.array(list(rng.normal(size=(k, 128)).astype(np.float32)),
                                            pa.list_(pa.float32())))
        t = pa.table(cols, schema=METADATA_SCHEMA)
        t = t.append_column("sku", pa.array([f"sku{(base + i) // 50:05d}" for i in range(k)]))
        t = t.append_column("template", pa.array([(base + i) // 2 % 5 for i in range(k)], pa.int32()))
        t = t.append_column("campaign", pa.array(["spring"] * k))
        pq.write_table(t, root / "metadata" / f"part-bench-{part:05d}.parquet")
    (root / "summary.json").write_text(json.dumps({"name": "bench"}))
    fs, r = filesystem(str(root))
    log = DecisionLog(fs, r)
    md = pq.read_table(root / "metadata", columns=["model", "id", "sample"])
    now = dt.datetime.now(dt.UTC)
    for i in range(0, decisions, 10):
        keys = md.slice(i * 37 % (n - 10), 10)
        log.append(decision_table(keys, "approve" if i % 20 else "reject", None, f"r{i % 3}", now))


def get(base: str, path: str) -> tuple[float, dict]:
    t = time.perf_counter()
    req = urllib.request.Request(base + path, headers={"Authorization": "Bearer bench"})
    with urllib.request.urlopen(req) as r:
        body = json.loads(r.read())
    return time.perf_counter() - t, body


def bench_page(n: int, decisions: int, browser: bool = True) -> None:
    import socket

    import uvicorn
    from promptmill.pipelines.review.app import build_app
    from promptmill.pipelines.review.grid import Grid

    logging.getLogger("promptmill.pipelines.review.grid").setLevel(logging.ERROR)  # no image files: one 404 per card
    root = Path(tempfile.mkdtemp()) / "run"
    synth_run(root, n, decisions)
    size = sum(p.stat().st_size for p in (root / "metadata").glob("*.parquet"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    t0 = time.perf_counter()
    grid = Grid(str(root))
    t_grid = time.perf_counter() - t0
    server = uvicorn.Server(uvicorn.Config(build_app(grid, "bench", "bench"), log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.005)
    t_meta, meta = get(base, "/api/meta")
    t_first, first = get(base, "/api/items?sort=score_desc&limit=48")
    opened = time.perf_counter() - t0
    assert meta["rows"] == n and len(first["rows"]) == 48
    print(f"{n:,} rows, metadata {size / 2**20:.1f} MB in 10 parts, {decisions:,} decisions in {decisions // 10} parts\n")
    print("| step | seconds |\n|---|---|")
    print(f"| read the run's columns (Grid) | {t_grid:.3f} |\n| GET /api/meta | {t_meta:.3f} |")
    print(f"| GET first page (48, by clip_score) | {t_first:.3f} |\n| **open, total** | **{opened:.3f}** |\n")
    cases = {"no filter, by clip_score": "sort=score_desc",
             "sku = one product": "sku=sku00042&sort=score_desc",
             "clip_score 20-30, no near-duplicates": "min_score=20&max_score=30&near_duplicate=false&sort=score_desc",
             "undecided only": "decision=none&sort=score_desc",
             "prompt contains 'purple'": "prompt=purple&sort=key"}
    print("| page turn (48 rows, 20 offsets) | median s | max s | matching rows |\n|---|---|---|---|")
    for name, q in cases.items():
        times, total = [], 0
        for k in range(20):
            dt_, body = get(base, f"/api/items?{q}&limit=48&offset={k * 997 % max(1, n // 2)}")
            times.append(dt_)
            total = body["total"]
        print(f"| {name} | {statistics.median(times):.3f} | {max(times):.3f} | {total:,} |")
    if browser:
        bench_browser(base)
    server.should_exit = True


def bench_browser(base: str) -> None:
    """The same run in headless Chromium (Debian's): from navigation to 48 cards drawn, and a page turn (`n`) to the
    next 48 drawn. The synthetic run has no image files: each card's thumbnail request is answered 404."""
    import shutil

    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=shutil.which("chromium"), headless=True, args=["--no-sandbox"])
        page = b.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{base}/?token=bench")  # sets the cookie; not timed
        times = {"open (navigate, 48 cards drawn)": [], "page turn (`n`, next 48 drawn)": []}
        for _ in range(5):
            t = time.perf_counter()
            page.goto(base + "/")
            expect(page.locator(".card")).to_have_count(48)
            times["open (navigate, 48 cards drawn)"].append(time.perf_counter() - t)
            for _ in range(2):
                before = page.inner_text("#range")
                t = time.perf_counter()
                page.keyboard.press("n")
                expect(page.locator("#range")).not_to_have_text(before)
                times["page turn (`n`, next 48 drawn)"].append(time.perf_counter() - t)
        b.close()
    print("\n| in headless Chromium | median s | max s |\n|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.3f} | {max(ts):.3f} |")


def bench_deliver(images: int) -> None:
    import itertools

    import yaml
    from promptmill.pipelines.delivery.deliver import DeliverSettings, deliver
    from promptmill.pipelines.delivery.placements import parse_placements
    from promptmill.pipelines.review.decisions import DecisionLog
    from promptmill.pipelines.storage import filesystem

    tmp = Path(tempfile.mkdtemp())
    prompts = [f"a {size} {c} {s} {where}" for size, c, s, where in
               itertools.product(["small", "large"], COLOURS, SHAPES, ["on the left", "at the top", "in the center"])]
    n_prompts = images // 2
    pq.write_table(pa.table({"id": [f"p{i:04d}" for i in range(n_prompts)], "prompt": prompts[:n_prompts],
                             "sku": [f"s{i // 3}" for i in range(n_prompts)]}), tmp / "prompts.parquet")
    spec = {"name": "bench", "input": {"path": str(tmp / "prompts.parquet"), "keep_columns": ["sku"]},
            "models": [{"name": "gan", "family": "gan", "checkpoint": "shipped:gan", "images_per_prompt": 2}],
            "scoring": {"enabled": False}, "output": {"path": str(tmp / "run")}}
    (tmp / "spec.yaml").write_text(yaml.safe_dump(spec))
    subprocess.run([sys.executable, "-m", "promptmill.jobs.cli", "--log-level", "WARNING", "generate",
                    str(tmp / "spec.yaml")], check=True, capture_output=True)
    fs, root = filesystem(str(tmp / "run"))
    md = pq.read_table(tmp / "run" / "metadata", columns=["model", "id", "sample"])
    DecisionLog(fs, root).decide(md, "approve", None, "bench")
    from promptmill.pipelines.review.grid import Grid

    grid = Grid(str(tmp / "run"))
    page = grid.query(grid.parse({"limit": "48", "sort": "key"}))["rows"]
    for label in ("cold", "cached"):
        t = time.perf_counter()
        for r in page:
            assert grid.thumbnail(r["model"], r["id"], r["sample"])
        print(f"\nthumbnails of one page (48, files layout, local disk), {label}: {time.perf_counter() - t:.3f} s")
    print(f"\n{len(md)} images of the shipped GAN (32x32) approved; deliver to local disk, 4 workers, crop\n")
    print("| placement | format | images/s | s | rerun (nothing to do) s |\n|---|---|---|---|---|")
    for fmt in ("jpeg", "png"):
        for p in parse_placements("feed=1080x1080,link=1200x628,story=1080x1920"):
            dest = str(tmp / f"out-{fmt}-{p.name}")
            s = DeliverSettings((p,), "crop", fmt)
            t = time.perf_counter()
            r = deliver(str(tmp / "run"), dest, s)
            secs = time.perf_counter() - t
            assert r.written == {p.name: len(md)}
            t = time.perf_counter()
            assert sum(deliver(str(tmp / "run"), dest, s).written.values()) == 0
            print(f"| {p.name} {p.width}x{p.height} | {fmt} | {len(md) / secs:.1f} | {secs:.2f} | "
                  f"{time.perf_counter() - t:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--decisions", type=int, default=2_000)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--skip-deliver", action="store_true")
    ap.add_argument("--no-browser", action="store_true", help="skip the headless Chromium timings")
    args = ap.parse_args()
    bench_page(args.rows, args.decisions, not args.no_browser)
    if not args.skip_deliver:
        bench_deliver(args.images)


if __name__ == "__main__":
    main()
