"""Calibrate `scoring.clip_near_duplicate_distance` for a CLIP: how far apart (cosine distance of image
embeddings) are copies of one image, against different images?

Copies: each image re-encoded as JPEG (quality 75) and shifted by one pixel, what a generator that collapsed to
one output per prompt gives. Different: every pair of distinct images. Prints both distributions' quantiles and
the midpoint between the copies' 99th percentile and the different pairs' 1st, the threshold to use.

    python benchmarks/near_duplicates.py [--clip shipped] [--images PARQUET --image-column png] [--n 300]

Without --images it uses shapes renders (the demo domain); for a real CLIP, point it at a few hundred of the
images your models draw (a run's `metadata/` in the parquet layout, or any image Parquet).
"""

from __future__ import annotations

import argparse
import io

import numpy as np
from PIL import Image
from promptmill.models.clip_loader import load_clip
from promptmill.models.images import decode_image
from promptmill.models.shapes.scenes import example
from promptmill.pipelines.spec import SHIPPED
from promptmill.pipelines.tables import read_rows


def copy_of(img: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(np.roll(img, 1, axis=1)).save(buf, format="JPEG", quality=75)
    return decode_image(buf.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clip", default=str(SHIPPED / "clip"))
    ap.add_argument("--images", default=None)
    ap.add_argument("--image-column", default="png")
    ap.add_argument("--n", type=int, default=300)
    args = ap.parse_args()
    if args.images:
        images = [decode_image(b) for b in read_rows(args.images, [args.image_column], max_rows=args.n)[args.image_column]]
    else:
        images = [example(i, 11, "test")[2] for i in range(args.n)]
    scorer = load_clip(args.clip)
    a = np.concatenate([scorer.embed_images(np.stack(images[i:i + 64])).numpy() for i in range(0, len(images), 64)])
    b = np.concatenate([scorer.embed_images(np.stack([copy_of(im) for im in images[i:i + 64]])).numpy()
                        for i in range(0, len(images), 64)])
    copies = 1 - (a * b).sum(1)
    d = 1 - a @ a.T
    different = d[np.triu_indices(len(a), 1)]
    q = [1, 50, 99]
    print(f"clip {args.clip}, {len(images)} images ({args.images or 'shapes renders'})")
    print("copies     (image vs its JPEG re-encode, 1 px shift): " +
          ", ".join(f"p{p} {v:.4f}" for p, v in zip(q, np.percentile(copies, q))))
    print("different  (every pair of distinct images):           " +
          ", ".join(f"p{p} {v:.4f}" for p, v in zip(q, np.percentile(different, q))))
    hi, lo = np.percentile(copies, 99), np.percentile(different, 1)
    print(f"threshold  (midpoint of copies p99 and different p1): {(hi + lo) / 2:.4f}"
          + ("" if hi < lo else "  (the two overlap: this CLIP cannot tell copies apart here)"))


if __name__ == "__main__":
    main()
