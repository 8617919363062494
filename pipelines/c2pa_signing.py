"""Signed provenance: a C2PA manifest in each image (c2pa-python), beside the XMP marker of `pipelines.provenance`.

The manifest says the image was created by an AI tool (`c2pa.created`, IPTC `trainedAlgorithmicMedia`), which
promptmill made it, and from what (prompt, model, checkpoint id, seed), signed with the team's certificate. The
certificate and key are read where images are written (a Ray worker), once per process, from a path / URL or an
environment variable; they never pass through the spec, the object store or a log line.
"""

from __future__ import annotations

import io
import os
import threading
from typing import TYPE_CHECKING

from promptmill.pipelines.provenance import TRAINED_ALGORITHMIC_MEDIA, bounded
from promptmill.pipelines.redaction import ENV_REF, redact_text
from promptmill.pipelines.storage import filesystem

from promptmill import __version__

if TYPE_CHECKING:
    from promptmill.pipelines.spec import C2paSpec

MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}  # every IMAGE_FORMATS entry c2pa signs
ASSERTION = "io.promptmill.generation"  # our own assertion label (reverse domain, as C2PA asks of custom ones)
INSTALL = "pip install 'promptmill[c2pa]'"
_INTS = ("seed", "sample")


class SigningError(ValueError):
    """The certificate or key cannot be read or does not sign; the message names the field."""


def read_pem(ref: str, storage_options: dict, field: str) -> bytes:
    """PEM bytes from a path / URL, or from `${NAME}`: the variable holds the PEM itself or a path to it."""
    m = ENV_REF.fullmatch(ref.strip())
    if m:
        if m[1] not in os.environ:
            raise SigningError(f"{field}: ${{{m[1]}}} is not set in this environment")
        ref = os.environ[m[1]]
        if ref.lstrip().startswith("-----BEGIN"):
            return ref.encode()
    try:
        fs, path = filesystem(ref, storage_options)
        data = fs.cat_file(path)
    except Exception as e:  # noqa: BLE001 - any storage error is this field's
        raise SigningError(f"{field}: cannot read {redact_text(ref)!r} ({type(e).__name__}: {redact_text(str(e))})") from e
    if b"-----BEGIN" not in data:
        raise SigningError(f"{field}: {redact_text(ref)!r} is not PEM")
    return data


def manifest(fields: dict[str, str]) -> dict:
    """The manifest definition of one image: AI-created action, and our assertion from its provenance fields."""
    ours = {k: (int(v) if k in _INTS and v.lstrip("-").isdigit() else v) for k, v in bounded(fields).items()}
    return {"claim_generator_info": [{"name": "promptmill", "version": __version__}],
            "assertions": [
                {"label": "c2pa.actions", "data": {"actions": [{
                    "action": "c2pa.created", "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                    "softwareAgent": {"name": "promptmill", "version": __version__}}]}},
                {"label": ASSERTION, "data": ours}]}


class Signer:
    """One process's signer: the key loaded once, reused for every image."""

    def __init__(self, spec: C2paSpec) -> None:
        try:
            import c2pa
        except ImportError as e:
            raise SigningError(f"output.c2pa: c2pa-python is not installed ({INSTALL})") from e
        cert = read_pem(spec.certificate, spec.storage_options, "output.c2pa.certificate")
        key = read_pem(spec.private_key, spec.storage_options, "output.c2pa.private_key")
        try:
            signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(spec.algorithm.encode(), cert, key, spec.tsa_url))
            # no thumbnail: it would add ~30 KB to a 32 px image, and the image is its own preview
            settings = c2pa.Settings.from_dict({"builder": {"thumbnail": {"enabled": False}}})
            self._context = c2pa.Context(settings=settings, signer=signer)
        except c2pa.C2paError as e:
            raise SigningError(f"output.c2pa: the certificate and key do not make a signer ({redact_text(str(e))})") from e
        self._builder = c2pa.Builder
        self._lock = threading.Lock()  # an actor may write two batches at once; one native context, one at a time

    def sign(self, data: bytes, image_format: str, fields: dict[str, str]) -> bytes:
        """`data` (an encoded image) with a signed manifest embedded; its other metadata (PNG text, XMP) is kept."""
        out = io.BytesIO()
        with self._lock:
            self._builder(manifest(fields), self._context).sign(MIME[image_format], io.BytesIO(data), out)
        return out.getvalue()


_SIGNERS: dict[str, Signer] = {}
_SIGNERS_LOCK = threading.Lock()


def signer(spec: C2paSpec) -> Signer:
    """This process's signer for `spec`, made on first use (a worker loads the key once, not per batch)."""
    key = spec.model_dump_json()
    with _SIGNERS_LOCK:
        if key not in _SIGNERS:
            _SIGNERS[key] = Signer(spec)
        return _SIGNERS[key]


def check_signing(spec: C2paSpec, image_format: str) -> None:
    """Preflight: the certificate and key load and sign a tiny image of the job's format (SigningError if not)."""
    import numpy as np
    from promptmill.pipelines.layout import encode_image

    if image_format not in MIME:
        raise SigningError(f"output.c2pa: image_format {image_format!r} cannot carry a manifest here; {sorted(MIME)} can")
    tiny = encode_image(np.zeros((8, 8, 3), np.uint8), image_format)
    try:
        signer(spec).sign(tiny, image_format, {"prompt": "preflight"})
    except SigningError:
        raise
    except Exception as e:  # noqa: BLE001 - c2pa's errors (a key that does not match the certificate, a bad chain)
        raise SigningError(f"output.c2pa: a test signature failed ({type(e).__name__}: {redact_text(str(e))}); check "
                           "that private_key matches certificate, algorithm matches the key, and the chain is whole") from e
