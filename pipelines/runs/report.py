"""`OUT/report.html`: one self-contained page per run (thumbnails and plots embedded as data URIs, so the
same file works for a local run, an S3 run and an email attachment). `promptmill report RUN_URL` rebuilds it.
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image
from promptmill.pipelines.layout import REPORT, SUMMARY, chooser_of
from promptmill.pipelines.runs.results import Run, score_summary
from promptmill.pipelines.storage import join, write_json

THUMB = 96  # small images (our 32 px models) are upscaled to this, nearest-neighbour, so each pixel shows
PHOTO = 192  # larger ones are downscaled to fit this box, keeping their aspect ratio
CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:8px 0 20px}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}th{background:#f3f3f3}
img.t{display:block}img.px{image-rendering:pixelated}.p{max-width:260px;font-size:13px}
.s{font-size:12px;color:#555}.bad{color:#b00}.ok{color:#070}"""


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def thumbnail_image(img: np.ndarray, small: int = THUMB, box: int = PHOTO) -> Image.Image:
    """Any size to a thumbnail: a small image (within `small`) upscaled by a whole factor (pixels stay sharp), a large
    one downscaled to fit `box`, aspect kept either way. The review page's thumbnails too, with its own sizes."""
    h, w = img.shape[:2]
    im = Image.fromarray(img)
    if max(h, w) <= small:
        k = max(1, small // max(h, w))
        return im.resize((w * k, h * k), Image.NEAREST)
    im.thumbnail((box, box), Image.LANCZOS)
    return im


def thumbnail(img: np.ndarray) -> str:
    """An <img class=t> of `thumbnail_image` (pixelated rendering for an upscaled one)."""
    im = thumbnail_image(img)
    cls = "t px" if max(img.shape[:2]) <= THUMB else "t"
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return f"<img class='{cls}' width={im.width} height={im.height} src='{_png_uri(buf.getvalue())}'"


def sample_grid(run: Run, per_model: int = 8) -> bytes | None:
    """One PNG: a row of `per_model` thumbnails (sample 0 of the first prompts by id) per model; None when empty."""
    md = run.metadata
    if not len(md):
        return None
    rows = []
    for m in run.models:
        t = md.filter(pc.and_(pc.equal(md["model"], m), pc.equal(md["sample"], 0))).sort_by("id").slice(0, per_model)
        rows.append([thumbnail_image(im) for im in run.images(t)])
    cell = max(max(im.width, im.height) for r in rows for im in r)
    grid = Image.new("RGB", (cell * max(map(len, rows)), cell * len(rows)), "white")
    for y, r in enumerate(rows):
        for x, im in enumerate(r):
            grid.paste(im, (x * cell, y * cell))
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return buf.getvalue()


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    if v is None:
        return "–"
    return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))


def _score_line(row: dict) -> str:
    parts = []
    if row.get("clip_score") is not None:
        parts.append(f"clip {row['clip_score']:.1f}")
    if row.get("prompt_match") is not None:
        cls = "ok" if row["prompt_match"] else "bad"
        parts.append(f"<span class={cls}>match {'yes' if row['prompt_match'] else 'no'}</span>")
    by = chooser_of(row.get("candidates"), row.get("rerank_by"))
    if by:
        parts.append(f"kept #{row['candidate_index']} of {row['candidates']} by {by}")
    return "<div class=s>" + " · ".join(parts) + "</div>"


def score_plot(metadata: pa.Table, models: list[str]) -> str | None:
    png = score_histogram(metadata, models)
    return _png_uri(png) if png else None


def score_histogram(metadata: pa.Table, models: list[str]) -> bytes | None:
    """PNG of each model's clip_score distribution (None when nothing was scored)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {m: [v for v in metadata.filter(pc.equal(metadata["model"], m)).column("clip_score").to_pylist()
                if v is not None] for m in models}
    if not any(data.values()):
        return None
    fig, ax = plt.subplots(figsize=(6, 3))
    for m, v in data.items():
        if v:
            ax.hist(v, bins=30, alpha=0.5, label=m)
    ax.set_xlabel("clip_score")
    ax.set_ylabel("images")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def build_report(run: Run, gallery_prompts: int = 24, extremes: int = 8, review_url: str | None = None) -> str:
    """`review_url`: where this run's review page (`promptmill review`) is served, linked at the top."""
    s, models, md = run.summary, run.models, run.metadata
    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>promptmill: {html.escape(s.get('name', ''))}"
             f"</title><style>{CSS}</style></head><body>",
             f"<h1>promptmill run: {html.escape(s.get('name', run.url))}</h1><p class=s>{html.escape(run.url)}</p>"]
    if review_url:
        parts.append(f"<p><a id=review href='{html.escape(review_url, quote=True)}'>Review and approve these images</a></p>")
    rej = s.get("rejected") or {}
    parts.append("<h2>Summary</h2>" + _table(["input rows", "accepted", "rejected", "images (total)", "images/s (this run)",
                                              "wall s"],
                 [[_fmt(s.get("input_rows")), _fmt(s.get("accepted")),
                   html.escape(", ".join(f"{k}: {v}" for k, v in sorted(rej.items())) or "0"),
                   html.escape(", ".join(f"{k}: {v}" for k, v in sorted((s.get("images_total") or {}).items()))),
                   _fmt(s.get("images_per_s")), _fmt(s.get("wall_s"))]]))
    scores = score_summary(md) if len(md) else {}
    metrics = (s.get("metrics") or {}).get("models", {})
    cols = ["images", "clip_score_mean", "aesthetic_mean", "prompt_match", "rerank", "diversity_mean",
            "near_duplicate_rate", "nsfw_images", "prompt_truncated_images"]
    mcols = ["fid", "kid", "inception_score", "precision", "recall"]
    rows_of = [*models, *(["real_vs_real"] if "real_vs_real" in metrics else [])]
    # a column no model has a value in (no judge, no checker, no metrics) says nothing: it is left out
    cols = [c for c in cols if any(scores.get(m, {}).get(c) is not None for m in rows_of)]
    mcols = [c for c in mcols if any(metrics.get(m, {}).get(c) is not None for m in rows_of)]
    parts.append("<h2>Per model</h2>" + _table(["model", *cols, *mcols],
                 [[html.escape(m), *(_fmt(scores.get(m, {}).get(c)) for c in cols),
                   *(_fmt(metrics.get(m, {}).get(c)) for c in mcols)]
                  for m in rows_of]))
    if metrics:
        parts.append(f"<p class=s>Metrics against {html.escape(str(s['metrics'].get('reference')))} in the "
                     f"{html.escape(str(s['metrics'].get('features')))}; real_vs_real is the floor of the same size.</p>")
    plot = score_plot(md, models) if len(md) else None
    if plot:
        parts.append(f"<h2>clip_score distribution</h2><img alt='clip_score histogram' src='{plot}'>")

    # side by side: the same prompt (sample 0) under every model
    first = md.filter(pc.equal(md["sample"], 0)) if len(md) else md
    by_key = {(r["model"], r["id"]): r for r in first.to_pylist()}
    ids = sorted({i for (_, i) in by_key if all((m, i) in by_key for m in models)})[:gallery_prompts]
    if ids:
        rows = [by_key[(m, i)] for i in ids for m in models]
        imgs = run.images(pa.Table.from_pylist(rows, schema=md.schema))
        thumbs = {(r["model"], r["id"]): thumbnail(im) for r, im in zip(rows, imgs)}
        parts.append("<h2>Side by side</h2>" + _table(["prompt", *models], [
            [f"<div class=p>{html.escape(by_key[(models[0], i)]['prompt'])}</div>",
             *(f"{thumbs[(m, i)]} alt='{html.escape(m)}'>{_score_line(by_key[(m, i)])}" for m in models)]
            for i in ids]))
    for m in models:
        t = md.filter(pc.and_(pc.equal(md["model"], m), pc.invert(pc.is_null(md["clip_score"]))))
        if not len(t):
            continue
        t = t.sort_by([("clip_score", "descending")])
        for title, part in (("best", t.slice(0, extremes)), ("worst", t.slice(max(0, len(t) - extremes)))):
            imgs = run.images(part)
            cells = [f"{thumbnail(im)} alt='{title}'><div class=p>{html.escape(r['prompt'])}</div>"
                     f"{_score_line(r)}" for r, im in zip(part.to_pylist(), imgs)]
            parts.append(f"<h3>{html.escape(m)}: {title} by clip_score</h3>" + _table([""] * len(cells), [cells]))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run: Run, review_url: str | None = None) -> str:
    """Writes report.html; a rebuild that succeeds clears the `report_error` an earlier attempt left in the summary."""
    path = join(run.root, REPORT)
    run.fs.pipe(path, build_report(run, review_url=review_url).encode())
    if run.summary.pop("report_error", None) is not None:
        write_json(run.fs, join(run.root, SUMMARY), run.summary)
    return path
