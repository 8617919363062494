"""Signed provenance (`pipelines/c2pa_signing.py`): a real job signs every image with a test CA's leaf, and
c2pa-python's Reader, an independent verifier, reads the manifests back."""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
from pathlib import Path

import pytest
from conftest import make_spec, write_prompts

c2pa = pytest.importorskip("c2pa")
from cryptography import x509  # noqa: E402 - after the skip: both come with the test extra
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402
from PIL import Image  # noqa: E402
from promptmill.pipelines.c2pa_signing import ASSERTION, SigningError, check_signing, read_pem  # noqa: E402
from promptmill.pipelines.provenance import TRAINED_ALGORITHMIC_MEDIA, read_fields  # noqa: E402
from promptmill.pipelines.spec import C2paSpec, SpecError, load_spec  # noqa: E402

SIGNER_CN = "promptmill test signer"


def _cert(cn: str, key, issuer_cn: str, issuer_key, ca: bool, aki: bool = True) -> x509.Certificate:
    """C2PA's certificate profile: v3, key usage digitalSignature and an EKU (emailProtection) for the leaf, and an
    authority key identifier (c2pa-rs refuses a certificate without one: "the certificate is invalid")."""
    now = datetime.datetime.now(datetime.UTC)
    name = lambda n: x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, n),  # noqa: E731
                                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "promptmill tests")])
    b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(issuer_cn)).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
         .not_valid_after(now + datetime.timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=not ca, content_commitment=False, key_encipherment=False,
                                      data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                                      encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if aki:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    if not ca:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _pem(c: x509.Certificate) -> bytes:
    return c.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, str]:
    """A test CA and its ES256 leaf, plus a certificate without an authority key identifier (as `openssl req -x509`
    made them before OpenSSL 3) and a key that belongs to neither."""
    d = tmp_path_factory.mktemp("c2pa")
    ca_key, leaf_key, other = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _cert("promptmill test CA", ca_key, "promptmill test CA", ca_key, ca=True)
    leaf = _cert(SIGNER_CN, leaf_key, "promptmill test CA", ca_key, ca=False)
    files = {"chain": _pem(leaf) + _pem(ca), "key": _key_pem(leaf_key), "ca": _pem(ca), "other_key": _key_pem(other),
             "no_aki": _pem(_cert("self", leaf_key, "self", leaf_key, ca=False, aki=False))}
    for name, data in files.items():
        (d / f"{name}.pem").write_bytes(data)
    return {name: str(d / f"{name}.pem") for name in files}


def test_preflight_signs_a_tiny_image_and_names_the_field_when_it_cannot(certs, monkeypatch):
    check_signing(C2paSpec(certificate=certs["chain"], private_key=certs["key"]), "png")
    for cert, key, words in ((certs["no_aki"], certs["key"], "test signature failed"),
                             (certs["chain"], certs["other_key"], "test signature failed"),
                             (certs["chain"], certs["key"] + ".missing", "output.c2pa.private_key: cannot read"),
                             ("${PM_NO_SUCH_CERT}", certs["key"], "output.c2pa.certificate: ${PM_NO_SUCH_CERT} is not set")):
        with pytest.raises(SigningError, match="output.c2pa") as e:
            check_signing(C2paSpec(certificate=cert, private_key=key), "png")
        assert words in str(e.value)
    # ${NAME}: the variable holds the PEM itself, or a path to it
    monkeypatch.setenv("PM_TEST_KEY", Path(certs["key"]).read_text())
    monkeypatch.setenv("PM_TEST_CERT", certs["chain"])
    assert read_pem("${PM_TEST_KEY}", {}, "k") == Path(certs["key"]).read_bytes()
    check_signing(C2paSpec(certificate="${PM_TEST_CERT}", private_key="${PM_TEST_KEY}"), "jpeg")


@pytest.mark.parametrize("image_format", ["png", "jpeg", "webp"])
def test_every_image_format_is_signed_over_its_provenance_and_verifies(certs, image_format):
    import numpy as np
    from promptmill.pipelines.c2pa_signing import MIME, signer
    from promptmill.pipelines.layout import encode_image

    fields = {"prompt": "a small red circle", "model": "gan", "seed": "7", "sample": "0", "checkpoint_id": "abc"}
    plain = encode_image(np.full((16, 16, 3), 200, np.uint8), image_format, fields)
    signed = signer(C2paSpec(certificate=certs["chain"], private_key=certs["key"])).sign(plain, image_format, fields)
    reader = _reader(signed, MIME[image_format])
    assert reader.get_validation_state() == "Valid"
    assert json.loads(reader.json())["manifests"][reader.get_active_manifest()["label"]]["assertions"][1]["data"] == {
        "prompt": "a small red circle", "model": "gan", "seed": 7, "sample": 0, "checkpoint_id": "abc"}
    assert Image.open(io.BytesIO(signed)).convert("RGB").getpixel((3, 3)) == (200, 200, 200)
    assert len(signed) - len(plain) < 5000  # the manifest and the certificate chain, no thumbnail


def test_the_cli_exits_2_naming_the_field_when_the_key_does_not_sign(tmp_path, checkpoints, certs):
    import subprocess
    import sys

    import yaml

    write_prompts(tmp_path / "in.parquet", ["a small red circle"], ["a"])
    spec = make_spec(str(tmp_path / "in.parquet"), str(tmp_path / "out"), checkpoints,
                     output={"path": str(tmp_path / "out"), "c2pa": {"certificate": certs["chain"],
                                                                       "private_key": "${PM_TEST_C2PA_KEY}"}})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    other = Path(certs["other_key"]).read_text()
    p = subprocess.run([sys.executable, "-m", "promptmill.jobs.cli", "generate", str(tmp_path / "job.yaml")],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PM_TEST_C2PA_KEY": other})
    assert p.returncode == 2, p.stderr
    assert "output.c2pa: a test signature failed" in p.stderr and other.splitlines()[1] not in p.stderr + p.stdout
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_pem_written_into_the_spec_is_refused_without_echoing_the_key(tmp_path, checkpoints, certs):
    key = Path(certs["key"]).read_text()
    body = key.splitlines()[1]
    spec = make_spec(str(tmp_path / "in.parquet"), str(tmp_path / "out"), checkpoints,
                     output={"path": str(tmp_path / "out"), "c2pa": {"certificate": certs["chain"], "private_key": key}})
    with pytest.raises(SpecError) as e:
        load_spec(spec)
    assert "output.c2pa.private_key" in str(e.value) and "PEM written into the spec" in str(e.value)
    assert body not in str(e.value) and "PRIVATE KEY-----***" in str(e.value)
    # a ${NAME} reference is kept as written (read where it signs), not resolved into the spec
    spec["output"]["c2pa"]["private_key"] = "${PM_UNSET_KEY_VAR}"
    assert load_spec(spec).output.c2pa.private_key == "${PM_UNSET_KEY_VAR}"


def test_an_output_is_signed_throughout_or_not_at_all(tmp_path, checkpoints, certs):
    from promptmill.pipelines.batch.preflight import PreflightError, fingerprint, preflight

    write_prompts(tmp_path / "in.parquet", ["a small red circle"], ["a"])
    out = tmp_path / "out"
    plain = load_spec(make_spec(str(tmp_path / "in.parquet"), str(out), checkpoints))
    signed = load_spec(make_spec(str(tmp_path / "in.parquet"), str(out), checkpoints, output={
        "path": str(out), "c2pa": {"certificate": certs["chain"], "private_key": certs["key"]}}))
    for before, now in ((plain, signed), (signed, plain)):
        out.mkdir(exist_ok=True)
        (out / "_spec.json").write_text(json.dumps(fingerprint(before)))
        with pytest.raises(PreflightError, match="already holds a run with c2pa"):
            preflight(now)
    preflight(signed)  # the same settings: fine (a new key or certificate too)


def test_a_spec_files_relative_certificate_path_resolves_against_its_folder(tmp_path):
    import yaml

    (tmp_path / "job.yaml").write_text(yaml.safe_dump({
        "name": "t", "input": {"path": "in.parquet"}, "models": [{"name": "g", "family": "gan", "checkpoint": "ckpt"}],
        "output": {"path": "out", "c2pa": {"certificate": "keys/chain.pem", "private_key": "${PM_UNSET_KEY_VAR}"}}}))
    c = load_spec(tmp_path / "job.yaml").output.c2pa
    assert (c.certificate, c.private_key) == (str(tmp_path / "keys" / "chain.pem"), "${PM_UNSET_KEY_VAR}")


def _reader(data: bytes, mime: str, trust: str | None = None):
    settings = {"verify": {"verify_trust": True}, "trust": {"trust_anchors": Path(trust).read_text()}} if trust else None
    ctx = c2pa.Context(settings=c2pa.Settings.from_dict(settings)) if settings else None
    return c2pa.Reader(mime, io.BytesIO(data), context=ctx)


@pytest.mark.parametrize("image_format,layout", [("png", "files"), ("jpeg", "parquet")])
def test_a_job_signs_every_image_and_a_verifier_reads_the_manifest(ray_local, checkpoints, certs, tmp_path, image_format,
                                                                   layout):
    from promptmill.pipelines.batch.job import run_job
    from promptmill.pipelines.metadata import read_metadata
    from promptmill.pipelines.runs.results import Run, read_image_bytes

    write_prompts(tmp_path / "in.parquet", ["a small red circle on the left", "a large blue square"], ["a", "b"])
    out = tmp_path / "out"
    spec = make_spec(str(tmp_path / "in.parquet"), str(out), checkpoints, scoring={"enabled": False},
                     output={"path": str(out), "image_format": image_format, "format": layout, "report": False,
                             "c2pa": {"certificate": certs["chain"], "private_key": certs["key"]}})
    result = run_job(load_spec(spec))
    assert sum(result.images_written.values()) == 4 and (out / "_SUCCESS").exists()
    run = Run(str(out))
    md = read_metadata(run.fs, run.root)  # every column: the image bytes too in the parquet layout
    mime = {"png": "image/png", "jpeg": "image/jpeg"}[image_format]
    rows = md.to_pylist()
    for row, data in zip(rows, read_image_bytes(run.fs, md, run.root)):
        assert hashlib.sha256(data).hexdigest() == row["sha256"]  # of the signed file as stored
        reader = _reader(data, mime)
        store = json.loads(reader.json())
        active = store["manifests"][store["active_manifest"]]
        # what a verifier reports for a leaf of a CA it does not know: the signature and hashes check out
        # ("Valid"), and the one status entry is that the signing credential is untrusted
        assert reader.get_validation_state() == "Valid"
        assert [s["code"] for s in store["validation_status"]] == ["signingCredential.untrusted"]
        assert active["signature_info"]["common_name"] == SIGNER_CN and active["signature_info"]["alg"] == "Es256"
        assert active["claim_generator_info"][0]["name"] == "promptmill"
        assertions = {a["label"]: a["data"] for a in active["assertions"]}
        [created] = assertions["c2pa.actions.v2"]["actions"]
        assert created["action"] == "c2pa.created" and created["digitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
        ours = assertions[ASSERTION]
        assert (ours["prompt"], ours["model"], ours["seed"], ours["sample"], ours["checkpoint_id"]) == (
            row["prompt"], "gan", row["seed"], row["sample"], row["checkpoint_id"])
        # the team's CA as a trust anchor: the same file is trusted
        assert _reader(data, mime, certs["ca"]).get_validation_state() == "Trusted"
        # our unsigned provenance is still there: XMP marker in every format, PNG text chunks
        im = Image.open(io.BytesIO(data))
        xmp = im.info["xmp"].decode() if isinstance(im.info.get("xmp"), bytes) else im.text["XML:com.adobe.xmp"]
        assert f'DigitalSourceType="{TRAINED_ALGORITHMIC_MEDIA}"' in xmp
        if image_format == "png":
            assert read_fields(im)["prompt"] == row["prompt"]
    # one pixel changed: the data hash no longer matches
    tampered = bytearray(data)
    tampered[data.find(b"IDAT") + 8 if image_format == "png" else len(data) - 3] ^= 0xFF  # image data, not the manifest
    reader = _reader(bytes(tampered), mime)
    assert reader.get_validation_state() == "Invalid"
    assert any(s["code"].startswith("assertion.dataHash") for s in json.loads(reader.json())["validation_status"])
