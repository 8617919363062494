"""Provenance inside each image: what made it (prompt, model, checkpoint and its content id, seed) and the
"AI-generated" marker, so an ad creative that leaves the output still says where it came from.

PNG: tEXt chunks (`promptmill:prompt`, ...) plus an XMP packet (iTXt `XML:com.adobe.xmp`); JPEG and WebP: the
same XMP packet. The marker is IPTC's digital source type `trainedAlgorithmicMedia`, as IPTC and the C2PA
guidance describe for generated images. The signed C2PA manifest (`output.c2pa`) is `pipelines.c2pa_signing`'s.
"""

from __future__ import annotations

import hashlib
from xml.sax.saxutils import escape, quoteattr

from PIL import PngImagePlugin

TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
FIELDS = ("prompt", "model", "family", "checkpoint", "checkpoint_id", "seed", "sample")
MAX_FIELD_CHARS = 2000  # per field: a JPEG's XMP segment holds at most 64 KB, and every field of a row goes in


def bounded(fields: dict[str, str]) -> dict[str, str]:
    """`fields` with any value over MAX_FIELD_CHARS cut, and `<field>_sha256` of its full text beside it, so a
    long prompt still identifies itself and an image is never refused for the length of its metadata."""
    out = {}
    for k, v in fields.items():
        if len(v) > MAX_FIELD_CHARS:
            out[k] = v[:MAX_FIELD_CHARS] + "…"
            out[f"{k}_sha256"] = hashlib.sha256(v.encode()).hexdigest()
        else:
            out[k] = v
    return out


def xmp_packet(fields: dict[str, str]) -> bytes:
    """XMP with IPTC's DigitalSourceType, the prompt as dc:description and our fields under a promptmill prefix."""
    ours = "".join(f"\n    promptmill:{k}={quoteattr(v)}" for k, v in fields.items() if k != "prompt")
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
        ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
        '  <rdf:Description rdf:about=""\n'
        '    xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"\n'
        '    xmlns:dc="http://purl.org/dc/elements/1.1/"\n'
        '    xmlns:promptmill="https://github.com/promptmill/ns/1.0/"\n'
        f'    Iptc4xmpExt:DigitalSourceType="{TRAINED_ALGORITHMIC_MEDIA}"{ours}>\n'
        '   <dc:description><rdf:Alt><rdf:li xml:lang="x-default">'
        f'{escape(fields.get("prompt", ""))}</rdf:li></rdf:Alt></dc:description>\n'
        '  </rdf:Description>\n'
        ' </rdf:RDF>\n'
        '</x:xmpmeta>\n'
        '<?xpacket end="r"?>'
    ).encode()


def save_arguments(fmt: str, fields: dict[str, str]) -> dict:
    """Extra Pillow save() arguments that embed `fields` (bounded) and the marker in an image of format `fmt`."""
    fields = bounded(fields)
    xmp = xmp_packet(fields)
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        for k, v in fields.items():
            info.add_itxt(f"promptmill:{k}", v)  # iTXt: UTF-8 (prompts are not Latin-1)
        info.add_itxt("XML:com.adobe.xmp", xmp.decode())
        return {"pnginfo": info}
    return {"xmp": xmp}  # JPEG (APP1) and WebP (XMP chunk)


def read_fields(img) -> dict[str, str]:
    """The promptmill fields of an opened PNG (what `save_arguments` wrote)."""
    return {k.split(":", 1)[1]: str(v) for k, v in getattr(img, "text", {}).items() if k.startswith("promptmill:")}
