"""Staging model weights in object storage (`promptmill stage-model`): copy, then prove the copy is whole and of a
layout a loader accepts, before a cluster job depends on it."""

from __future__ import annotations

import json
from pathlib import Path

from promptmill.models.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError
from promptmill.models.hf_diffusers import INDEX
from promptmill.pipelines.storage import filesystem, full_url, join


def kind_of(files: set[str]) -> str:
    """diffusers (model_index.json), hf-clip (config.json model_type clip) or promptmill (config.json + weights)."""
    if INDEX in files:
        return "diffusers"
    if CONFIG_NAME in files and WEIGHTS_NAME in files:
        return "promptmill"
    if CONFIG_NAME in files:
        return "hf-clip"
    raise CheckpointError(f"no {INDEX} or {CONFIG_NAME}: not a model directory promptmill can load")


def stage_model(src: str, dst: str, storage_options: dict | None = None, load: bool = False) -> str:
    root = Path(src).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"{src!r} is not a local directory")
    local = {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    kind = kind_of(set(local))
    fs, droot = filesystem(dst, storage_options)
    for rel in local:  # file by file: one failed upload names its file
        fs.put_file(str(root / rel), join(droot, rel))
    fs.invalidate_cache()
    remote = {p[len(droot.rstrip("/")) + 1:]: info["size"] for p, info in fs.find(droot, detail=True).items()}
    wrong = sorted(rel for rel, size in local.items() if remote.get(rel) != size)
    if wrong:
        raise CheckpointError(f"{full_url(fs, droot)}: {len(wrong)} files missing or of another size after the copy: "
                              f"{wrong[:5]}")
    if kind == "diffusers":  # every component the index names is there
        index = json.loads((root / INDEX).read_text())
        missing = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None
                   and not any(r.startswith(f"{k}/") for r in remote)]
        if missing:
            raise CheckpointError(f"{full_url(fs, droot)}: {INDEX} names components with no folder: {missing}")
    if load:
        _load(kind, full_url(fs, droot), storage_options)
    total = sum(local.values())
    return f"staged {len(local)} files ({total / 2**20:.1f} MB, {kind}) -> {full_url(fs, droot)}" + (
        "; loads from there" if load else "")


def _load(kind: str, url: str, storage_options: dict | None) -> None:
    import torch

    if kind == "diffusers":
        from promptmill.models.hf_diffusers import DiffusersGenerator

        DiffusersGenerator.load(url, torch.device("cpu"), storage_options)
    elif kind == "hf-clip":
        from promptmill.models.hf_clip import load_hf_clip

        load_hf_clip(url, "cpu", storage_options)
    else:
        from promptmill.models.checkpoint import load_checkpoint

        load_checkpoint(url, storage_options)
