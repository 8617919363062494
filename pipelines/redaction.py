"""Redaction: the one way anything that leaves the process (specs, summaries, metadata, logs, errors) loses its
secrets. Its own module because storage, retries and every command use it, and the spec only feeds it."""

from __future__ import annotations

import re
from typing import Any

_SECRET = re.compile(r"(key|secret|token|passw|credential|authorization|signature|connection_string|session|cookie|"
                     r"private)", re.IGNORECASE)
_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")  # scheme://user:pass@host
_QUERY = re.compile(r"([?&])([^=&#\s]+)=([^&#\s]*)")
_SIGNING = {"sig", "x-amz-credential", "x-amz-security-token", "x-goog-credential", "x-goog-signature"}
_CONN_KV = re.compile(r"\b(AccountKey|SharedAccessKey|SharedAccessSignature|Password|Pwd)=[^;\s]*", re.IGNORECASE)
_PEM_KEY = re.compile(r"-----BEGIN ([A-Z0-9 ]*PRIVATE KEY)-----.*?(?:-----END \1-----|\Z)", re.DOTALL)
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")  # `${NAME}`: a reference, not a secret written out
_RESOLVED: set[str] = set()  # what this process put into storage options for `${NAME}`: `redact_text` masks it
_MIN_MASKED = 6  # shorter values (a region's "eu", a bucket "data") would mask ordinary words in every log line


def remember_secret(value: str) -> None:
    """A value this process resolved into storage options: masked in every later `redact_text`."""
    if len(value) >= _MIN_MASKED:
        _RESOLVED.add(value)


def literal_secrets(data: Any, where: str = "") -> list[str]:
    """Field paths holding a secret written out (not a `${ENV_VAR}` reference): what must not be sent anywhere."""
    if isinstance(data, dict):
        return [p for k, v in data.items() for p in (
            [f"{where}.{k}" if where else str(k)] if isinstance(k, str) and _SECRET.search(k) and _is_literal(v)
            else literal_secrets(v, f"{where}.{k}" if where else str(k)))]
    if isinstance(data, list):
        return [p for i, v in enumerate(data) for p in literal_secrets(v, f"{where}[{i}]")]
    return [where] if isinstance(data, str) and _is_literal(data) and redact_text(data) != data else []


def _is_literal(v: Any) -> bool:
    """A secret written out: text that is not a `${ENV_VAR}` reference (as in `redact`, other values are data)."""
    return isinstance(v, str) and v != "" and not ENV_REF.fullmatch(v.strip())


def redact(obj: Any) -> Any:
    """Copy of `obj` safe to write or print: text values under secret-looking keys become '***', and in every
    string the userinfo of URLs (`user:pass@`) and secret-looking query parameters (presigned-URL signatures, SAS
    tokens) become '***'. The one redaction used for specs, summaries, metadata, logs and errors.

    Only a text value is masked: a credential is text, while a mapping keyed by data (a model named `monkey`,
    `images_total: {monkey: 4}`) must keep its values, so a dict, list or number under such a key is walked."""
    if isinstance(obj, dict):
        return {k: ("***" if isinstance(k, str) and _SECRET.search(k) and isinstance(v, str | bytes) else redact(v))
                for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def redact_text(text: str) -> str:
    for value in sorted(_RESOLVED, key=len, reverse=True):  # longest first: one value may hold another
        text = text.replace(value, "***")
    text = _PEM_KEY.sub(r"-----BEGIN \1-----***-----END \1-----", text)  # a key pasted where a path belongs
    text = _USERINFO.sub(r"\1***@", text)
    text = _QUERY.sub(lambda m: f"{m[1]}{m[2]}=***" if _SECRET.search(m[2]) or m[2].lower() in _SIGNING else m[0], text)
    return _CONN_KV.sub(lambda m: f"{m[1]}=***", text)
