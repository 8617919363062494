"""`promptmill deliver` on a real run, locally and on moto S3: every placement's size, the manifest, idempotence,
withdrawal, provenance in the delivered files; and a schedule that reviews (auto) and delivers each fire."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from promptmill.jobs.cli import main as cli
from promptmill.pipelines.delivery.placements import Placement, border_colour, fit_image, parse_colour, parse_placements
from promptmill.pipelines.provenance import TRAINED_ALGORITHMIC_MEDIA, read_fields
from promptmill.pipelines.review.decisions import DecisionLog, latest
from promptmill.pipelines.review.grid import Grid
from promptmill.pipelines.storage import filesystem
from review_runs import ad_run, copy_run

SIZES = {"feed": (1080, 1080), "link": (1200, 628), "story": (1080, 1920)}


@pytest.fixture(scope="module")
def made_run(ray_local, checkpoints, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deliver")
    return ad_run(tmp, checkpoints, str(tmp / "run"))


def approve(url: str, keys: list[tuple[str, int]], decision: str = "approve", opts: dict | None = None) -> None:
    fs, root = filesystem(url, opts)
    t = pa.table({"model": ["gan"] * len(keys), "id": [k[0] for k in keys], "sample": [k[1] for k in keys]})
    DecisionLog(fs, root).decide(t, decision, None if decision == "approve" else "off-brand", "alice")


def deliver(capsys, *args: str) -> dict:
    assert cli(["deliver", *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_placements_parse_and_fit():
    ps = parse_placements("feed=1080x1080, link=1200x628")
    assert ps == [Placement("feed", 1080, 1080), Placement("link", 1200, 628)]
    for bad, match in (("feed=1080", "WIDTHxHEIGHT"), ("../x=10x10", "placement name"), ("a=1x1,a=2x2", "twice"),
                       ("big=99999x10", "outside"), ("", "none given")):
        with pytest.raises(ValueError, match=match):
            parse_placements(bad)
    with pytest.raises(ValueError, match="pad colour"):
        parse_colour("red")
    img = np.zeros((32, 32, 3), np.uint8)
    img[:] = (10, 200, 30)  # a green border
    img[8:24, 8:24] = (250, 0, 0)
    assert border_colour(img) == (10, 200, 30)
    crop = fit_image(img, Placement("link", 120, 60), "crop")
    assert crop.shape == (60, 120, 3)
    pad = fit_image(img, Placement("link", 120, 60), "pad")
    assert pad.shape == (60, 120, 3) and tuple(pad[30, 2]) == (10, 200, 30)  # padded with the border colour
    assert tuple(fit_image(img, Placement("s", 60, 120), "pad", (0, 0, 255))[2, 30]) == (0, 0, 255)


def test_deliver_local_sizes_manifest_provenance_idempotence(made_run, tmp_path, capsys):
    run = str(copy_run(Path(made_run), tmp_path / "run"))
    dest = tmp_path / "delivered"
    approve(run, [("p0", 0), ("p1", 1), ("p2", 0)])
    first = deliver(capsys, run, "--to", str(dest), "--format", "png")
    assert first["written"] == {"feed": 3, "link": 3, "story": 3} and first["manifest_written"]
    manifest = pq.read_table(dest / "manifest.parquet")
    csv = pacsv.read_csv(dest / "manifest.csv")
    assert len(manifest) == len(csv) == 9 and csv["path"].to_pylist() == manifest["path"].to_pylist()
    for c in ("id", "sku", "template", "campaign", "placement", "path", "width", "height", "sha256", "prompt", "model",
              "clip_score", "approved_by", "approved_at"):
        assert c in manifest.column_names, c
    md = {(r["id"], r["sample"]): r for r in pq.read_table(f"{run}/metadata").to_pylist()}
    for r in manifest.to_pylist():
        data = (dest / r["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == r["sha256"]
        im = Image.open(io.BytesIO(data))
        assert im.size == SIZES[r["placement"]] == (r["width"], r["height"])
        src = md[(r["id"], r["sample"])]
        assert r["prompt"] == src["prompt"] and r["sku"] == src["sku"] and r["approved_by"] == "alice"
        assert r["source_sha256"] == src["sha256"]
        fields = read_fields(im)  # provenance kept: the prompt, the model, the AI marker in the XMP packet
        assert fields["prompt"] == src["prompt"] and fields["model"] == "gan" and fields["placement"] == r["placement"]
        assert TRAINED_ALGORITHMIC_MEDIA in im.info["XML:com.adobe.xmp"]
    stamps = {p: p.stat().st_mtime_ns for p in dest.rglob("*") if p.is_file()}
    # a second run writes nothing new
    again = deliver(capsys, run, "--to", str(dest), "--format", "png")
    assert again["written"] == {"feed": 0, "link": 0, "story": 0} and again["already_delivered"] == 9
    assert not again["manifest_written"]
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*") if p.is_file()} == stamps
    # more approvals: only those are added; a rejection withdraws the image's files
    approve(run, [("p3", 1)])
    approve(run, [("p2", 0)], "reject")
    third = deliver(capsys, run, "--to", str(dest), "--format", "png")
    assert third["written"] == {"feed": 1, "link": 1, "story": 1} and third["withdrawn"] == 3
    manifest = pq.read_table(dest / "manifest.parquet")
    assert sorted({(i, s) for i, s in zip(manifest["id"].to_pylist(), manifest["sample"].to_pylist())}) == \
        [("p0", 0), ("p1", 1), ("p3", 1)]
    assert not list(dest.rglob("p2-0.png"))
    assert all(stamps[p] == p.stat().st_mtime_ns for p in stamps if p.exists() and "manifest" not in p.name)
    # the manifest is anyone's to edit: a path out of the destination is never deleted
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"keep me")
    m = pq.read_table(dest / "manifest.parquet")
    forged = m.slice(0, 1).to_pylist()[0] | {"id": "p9", "path": "../outside.png"}
    pq.write_table(pa.concat_tables([m, pa.Table.from_pylist([forged], schema=m.schema)]), dest / "manifest.parquet")
    assert deliver(capsys, run, "--to", str(dest), "--format", "png")["withdrawn"] == 0
    assert outside.read_bytes() == b"keep me"
    # JPEG, padded: the XMP (prompt + AI marker) rides in the JPEG too
    jpg = deliver(capsys, run, "--to", str(tmp_path / "jpeg"), "--fit", "pad", "--placements", "link=1200x628")
    assert jpg["written"] == {"link": 3}
    im = Image.open(next((tmp_path / "jpeg" / "link").rglob("*.jpg")))
    assert im.format == "JPEG" and im.size == (1200, 628)
    xmp = im.info["xmp"].decode()
    assert TRAINED_ALGORITHMIC_MEDIA in xmp and "dc:description" in xmp
    assert any(md[k]["prompt"] in xmp for k in md)
    webp = deliver(capsys, run, "--to", str(tmp_path / "webp"), "--placements", "link=1200x628", "--format", "webp")
    assert webp["written"] == {"link": 3}
    im = Image.open(next((tmp_path / "webp" / "link").rglob("*.webp")))
    assert im.format == "WEBP" and im.size == (1200, 628) and TRAINED_ALGORITHMIC_MEDIA in im.info["xmp"].decode()
    # bad input names itself
    assert cli(["deliver", run, "--to", str(tmp_path / "x"), "--placements", "feed=1080"]) == 2
    assert "WIDTHxHEIGHT" in capsys.readouterr().err
    assert cli(["deliver", str(tmp_path / "nothing"), "--to", str(tmp_path / "x")]) == 2
    assert "not a finished run" in capsys.readouterr().err


def test_deliver_from_and_to_s3(ray_local, checkpoints, tmp_path, s3, capsys):
    run = ad_run(tmp_path, checkpoints, "s3://bucket/ads", s3)
    approve(run, [("p0", 0), ("p3", 1)], opts=s3)
    opts = json.dumps(s3)
    first = deliver(capsys, run, "--to", "s3://bucket/delivered", "--storage-options", opts)
    assert first["written"] == {"feed": 2, "link": 2, "story": 2}
    fs, _ = filesystem("s3://bucket", s3)
    manifest = pq.read_table(io.BytesIO(fs.cat_file("bucket/delivered/manifest.parquet")))
    assert fs.exists("bucket/delivered/manifest.csv") and len(manifest) == 6
    for r in manifest.to_pylist():
        data = fs.cat_file(f"bucket/delivered/{r['path']}")
        im = Image.open(io.BytesIO(data))
        assert im.size == SIZES[r["placement"]] and hashlib.sha256(data).hexdigest() == r["sha256"]
        assert TRAINED_ALGORITHMIC_MEDIA.encode() in im.info["xmp"] and r["prompt"].encode() in im.info["xmp"]
    again = deliver(capsys, run, "--to", "s3://bucket/delivered", "--storage-options", opts)
    assert sum(again["written"].values()) == 0 and not again["manifest_written"]
    # the review page's data over the same S3 run: rows, decisions, thumbnails by key
    grid = Grid(run, s3)
    page = grid.query(grid.parse({"decision": "approve", "sort": "key"}))
    assert [(r["id"], r["sample"], r["decision"]["reviewer"]) for r in page["rows"]] == [("p0", 0, "alice"), ("p3", 1, "alice")]
    assert Image.open(io.BytesIO(grid.thumbnail("gan", "p3", 1))).size == (192, 192)
    assert grid.thumbnail("gan", "p3", 5) is None


def test_a_schedule_reviews_and_delivers_each_fire(ray_local, checkpoints, tmp_path, capsys):
    pq.write_table(pa.table({"sku": ["s1", "s2"], "color": ["red", "blue"], "shape": ["circle", "square"]}),
                   tmp_path / "catalog.parquet")
    data = {"name": "ads", "cron": "0 6 * * *", "start": "2026-11-24T00:00:00Z",
            "catalog": {"path": "catalog.parquet"},
            "templates": ["a small {color} {shape} on the left", "a big {color} {shape}, top"],
            "models": [{"name": "gan", "family": "gan", "checkpoint": "shipped:gan", "images_per_prompt": 2}],
            "output": {"prefix": "runs"},
            "review": {"auto": {"best": 2, "per": "sku"}},
            "deliver": {"to": "delivered", "placements": {"feed": "1080x1080", "story": "1080x1920"}}}
    path = tmp_path / "schedule.yaml"
    path.write_text(yaml.safe_dump(data))
    assert cli(["schedule", str(path), "--once", "--at", "2026-11-24T06:10:00Z"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["status"] == "complete" and out["auto_approved"] == 4  # 2 per product, 2 products
    assert out["delivered"]["written"] == {"feed": 4, "story": 4}
    run = tmp_path / "runs" / "ads-20261124T060000Z"
    dest = tmp_path / "delivered" / "ads-20261124T060000Z"  # deliver.to resolved against the schedule's folder
    manifest = pq.read_table(dest / "manifest.parquet")
    assert sorted(manifest["sku"].to_pylist()) == ["s1"] * 4 + ["s2"] * 4
    assert set(manifest["approved_by"].to_pylist()) == {"auto"}
    md = pq.read_table(run / "metadata").to_pylist()
    for sku in ("s1", "s2"):  # the best two of each product by clip_score, near-duplicates skipped
        pool = sorted((r for r in md if r["sku"] == sku and not r["near_duplicate"]), key=lambda r: -r["clip_score"])
        assert {(r["id"], r["sample"]) for r in pool[:2]} == \
            {(r["id"], r["sample"]) for r in manifest.to_pylist() if r["sku"] == sku}
    # a person overrides on the review page (a later decision), the fire's slot is fired again: auto does not
    # decide twice, delivery follows the override
    first = manifest.filter(pc.equal(manifest["placement"], "feed")).to_pylist()[0]
    approve(str(run), [(first["id"], first["sample"])], "reject")
    assert cli(["schedule", str(path), "--once", "--at", "2026-11-24T06:20:00Z"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["status"] == "already complete" and "auto_approved" not in out and out["delivered"]["withdrawn"] == 2
    fs, root = filesystem(str(run))
    assert len(latest(DecisionLog(fs, root).refresh())) == 4  # 3 approved by auto, 1 rejected by alice
    # a bad deliver block names its field
    data["deliver"]["placements"] = {"feed": "1080"}
    path.write_text(yaml.safe_dump(data))
    assert cli(["schedule", str(path), "--once", "--at", "2026-11-24T06:10:00Z"]) == 2
    assert "deliver.placements" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["webdataset", "parquet"])
def test_review_and_deliver_read_images_in_any_layout(ray_local, checkpoints, tmp_path, capsys, layout):
    run = ad_run(tmp_path, checkpoints, str(tmp_path / "run"), layout=layout)
    grid = Grid(run)
    assert Image.open(io.BytesIO(grid.thumbnail("gan", "p1", 1))).size == (192, 192)
    approve(run, [("p1", 1)])
    out = deliver(capsys, run, "--to", str(tmp_path / "dest"), "--placements", "feed=1080x1080")
    assert out["written"] == {"feed": 1}
    im = Image.open(tmp_path / "dest" / "feed" / "gan" / "p1-1.jpg")
    assert im.size == (1080, 1080) and b"a large blue square" in im.info["xmp"]
