"""Vendor KubeRay's CRD schemas for the manifest tests: each CRD's openAPIV3Schema (served version v1), without
descriptions (most of their size), as JSON.

    git -C kuberay show v1.7.0:ray-operator/config/crd/bases/ray.io_rayjobs.yaml > /tmp/rayjobs.yaml  # and raycronjobs
    python tests/schemas/vendor_kuberay.py /tmp/ray.io_rayjobs.yaml ... --out tests/schemas/kuberay-1.7.0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def strip(node):
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("crds", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    for path in args.crds:
        crd = yaml.safe_load(path.read_text())
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        kind = crd["spec"]["names"]["kind"]
        (args.out / f"{kind}.json").write_text(json.dumps(strip(version["schema"]["openAPIV3Schema"]),
                                                          separators=(",", ":"), sort_keys=True))


if __name__ == "__main__":
    main()
