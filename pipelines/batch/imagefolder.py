"""The files layout's `images/<model>/metadata.jsonl`: Hugging Face `datasets`' imagefolder table (`file_name`
relative to that folder, then the metadata columns), rewritten from the committed metadata at each commit, so
`load_dataset("imagefolder", data_dir=<output>/images/<model>)` gives the images with their rows."""

from __future__ import annotations

import json
import logging

from fsspec import AbstractFileSystem
from promptmill.pipelines.layout import IMAGEFOLDER, IMAGES, run_path
from promptmill.pipelines.metadata import metadata_files, read_part
from promptmill.pipelines.storage import is_local_fs, join

log = logging.getLogger(__name__)
# not in the imagefolder table: no image bytes in this layout (`image`), `file_name` replaces image_path, and the
# 128-512 floats a row of judge_features / clip_features stay in metadata/ (they made each line ~4 KB)
DROPPED = ("image", "image_path", "judge_features", "clip_features")


def write_imagefolders(fs: AbstractFileSystem, root: str) -> dict[str, int]:
    """One `metadata.jsonl` per model from the committed parts, read one part at a time and streamed out (never
    the run in memory); each file appears whole (a local temporary renamed; an S3 upload completes at close).
    Returns rows per model. A row whose image lies outside `images/<model>/` (an edited row) is left out."""
    root = root.rstrip("/")
    out: dict[str, tuple] = {}
    counts: dict[str, int] = {}
    try:
        for f in metadata_files(fs, root)[0]:
            t = read_part(fs, f)
            rows = t.drop_columns([c for c in DROPPED if c in t.column_names]).to_pylist()
            for row, path in zip(rows, t.column("image_path").to_pylist()):
                folder = join(root, IMAGES, row["model"]) + "/"
                where = run_path(root, path) if path else ""
                if not where.startswith(folder):
                    log.warning("%s: image_path %r is not under %s; left out of %s", f, path, folder, IMAGEFOLDER)
                    continue
                if row["model"] not in out:
                    final = folder + IMAGEFOLDER
                    tmp = f"{final}.tmp" if is_local_fs(fs) else final
                    out[row["model"]] = (fs.open(tmp, "wb"), tmp, final)
                line = {"file_name": where[len(folder):], **row}
                out[row["model"]][0].write(json.dumps(line, default=str, ensure_ascii=False).encode() + b"\n")
                counts[row["model"]] = counts.get(row["model"], 0) + 1
    except BaseException:
        for fh, tmp, _ in out.values():
            if is_local_fs(fs):
                fh.close()
                fs.rm(tmp)
            else:
                fh.discard()  # S3: an upload never completed leaves no object
        raise
    for fh, tmp, final in out.values():
        fh.close()
        if tmp != final:
            fs.mv(tmp, final)
    return counts
