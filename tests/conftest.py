"""Shared fixtures: tiny random checkpoints (real save/load code), a real local Ray, a moto S3 server."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from promptmill.models.checkpoint import save_checkpoint
from promptmill.models.clip import CLIPConfig
from promptmill.models.gan import GANConfig, GANGenerator
from promptmill.models.tokenizer import WordTokenizer
from promptmill.models.transformer import TransformerConfig, TransformerGenerator
from promptmill.models.vq import VQConfig

# Ray Train's controller polls its workers every 2 s, so a run of a few steps idles up to 2 s at each end; the
# tests' Rays (and the `promptmill train` subprocesses, which inherit this env) poll 8x as often.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

CAPTIONS = ["a small red circle on the left", "a large blue square above a green triangle",
            "big yellow triangle, top, on a black background"]


def save_tiny(url: str, family: str, storage_options: dict | None = None, sampling: dict | None = None) -> str:
    """A tiny randomly initialised checkpoint of `family`, saved with the shipping code path; `sampling`: the one
    its config.json recommends."""
    import torch

    torch.manual_seed(0)
    tok = WordTokenizer.train(CAPTIONS, max_len=12)
    if family == "gan":
        text = CLIPConfig(vocab_size=len(tok.vocab), text_len=12, width=32, layers=1, heads=2, embed_dim=32)
        g = GANGenerator.build(GANConfig(text_dim=32, noise_dim=16, ngf=8, ndf=8), text, tok)
    else:
        cfg = TransformerConfig(text_vocab=len(tok.vocab), text_len=12, image_vocab=16, n_layer=1, n_head=2, n_embd=32)
        g = TransformerGenerator.build(cfg, VQConfig(hidden=8, embed_dim=8, codebook_size=16), tok)
    g.sampling_defaults = sampling or {}
    save_checkpoint(url, g.state_dict(), g.config(), storage_options)
    return url


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ckpt")
    return {f: save_tiny(str(root / f), f) for f in ("gan", "transformer")}


def write_prompts(path: Path | str, prompts: list, ids: list | None = None, **extra) -> str:
    cols = {"prompt": prompts, **extra}
    if ids is not None:
        cols = {"id": ids, **cols}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path)
    return str(path)


def make_spec(input_path: str, output_path: str, checkpoints: dict[str, str], **over) -> dict:
    spec = {
        "name": "test", "seed": 0,
        "input": {"path": input_path, "id_column": "id"},
        "models": [{"name": "gan", "family": "gan", "checkpoint": checkpoints["gan"], "images_per_prompt": 2,
                    "resources": {"batch_size": 8}}],
        "output": {"path": output_path},
    }
    for k, v in over.items():
        spec[k] = v
    return spec


@pytest.fixture(scope="module")
def ray_local():
    import ray

    if ray.is_initialized():  # the embedded Ray of an earlier CLI test's job (its model checks run while Ray starts)
        ray.shutdown()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` (a driver with its embedded Ray, or a `ray start --block` head)
    and nothing else: `ray stop` would kill every Ray on the machine."""
    import psutil

    victims = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                victims.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    for p in victims:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(victims, timeout=30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on loopback; yields storage_options for s3fs and a fresh bucket name per test module."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    opts = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    import urllib.request

    import s3fs

    # moto's backend is process-global: every module starts from an empty S3
    urllib.request.urlopen(urllib.request.Request(f"{opts['endpoint_url']}/moto-api/reset", method="POST"))
    fs = s3fs.S3FileSystem(**opts)
    fs.invalidate_cache()
    fs.mkdir("bucket")
    yield opts
    server.stop()
