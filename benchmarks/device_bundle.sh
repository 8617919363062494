#!/usr/bin/env bash
# The packages `benchmarks/gpu.py` and `docs/experiments/device_train.sh` need on a lent GPU machine that has python3.12 and a CUDA torch but no Ray,
# no pydantic and no package index: built here, carried there (the `run` tool carries at most 64 MiB).
#
#     benchmarks/device_bundle.sh            # -> .devpkgs/site.tar.xz (gitignored); ~3 min
#     (PY names a python 3.12 to check the imports with; on the 2-core machine: PYENV_VERSION=3.12.1)
#     run carry=[".devpkgs"]:  tar -xJf .devpkgs/site.tar.xz -C /tmp &&
#                              PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu.py --out $OUT ...
#
# Local files only in what the benchmark writes, so no s3fs/botocore; no torch (the machine's CUDA build is used).
# Trimmed to fit (657 MB installed; 62 MB with every dependency, less without the device image's own): tests,
# headers, Ray's Java jars and dashboard web client, Arrow
# Flight and Arrow's own S3 (pyarrow.lib does not link them; pyarrow.fs skips S3 without it), debug symbols.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-python3.12}  # any python can download for 3.12; this one also checks the imports
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip install -q --target "$work/site" --python-version 3.12 --implementation cp --only-binary=:all: \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  "ray[data,train]==2.60.0" "pydantic>=2.7" "pyarrow>=17" "fsspec>=2024.6" pyyaml "safetensors>=0.4" "pillow>=10" numpy \
  psutil nvidia-ml-py croniter
cd "$work/site"
rm -rf ray/jars ray/dashboard/client/build ray/tests pandas/tests pyarrow/tests pyarrow/include numpy/tests \
  numpy/*/tests bin pyarrow/libarrow_flight.so* pyarrow/libarrow_python_flight.so* pyarrow/_flight*.so \
  pyarrow/libarrow_s3.so* pyarrow/_s3fs*.so
find . -name __pycache__ -prune -exec rm -rf {} +
find . -type f \( -name "*.so*" -o -path "./ray/core/src/ray/*" \) -exec sh -c 'file -b "$1" | grep -q "^ELF" && strip --strip-unneeded "$1"' _ {} \;
if [ "$("$PY" -c 'import sys; print(sys.version_info[:2] == (3, 12))')" = True ]; then  # the bundle imports
  # and the stripped raylet and GCS start, and Ray Data runs a plan on them
  (cd /tmp && PYTHONDONTWRITEBYTECODE=1 PYTHONPATH="$work/site" "$PY" -c "
import ray, ray.data, ray.train, pydantic, pyarrow as pa, pyarrow.parquet, pyarrow.fs, pyarrow.dataset, fsspec, yaml, safetensors, PIL
import psutil, pynvml, croniter
ray.init(address='local', num_cpus=2, include_dashboard=False, log_to_driver=False)
assert ray.data.from_arrow(pa.table({'x': list(range(100))})).map_batches(lambda t: t).sum('x') == 4950
ray.shutdown()" > "$work/check.log" 2>&1) || { tail -20 "$work/check.log"; exit 1; }
fi
# what the device image already holds (/work/.library/device/KINDS.md) stays there: with pyarrow, pandas, numpy and
# pillow in it the bundle did not fit beside the repository in one call's 64 MiB
(cd "$work/site" && rm -rf pyarrow pyarrow-* pandas pandas-* numpy numpy-* numpy.libs PIL pillow-* pillow.libs \
  tzdata tzdata-* yaml _yaml pyyaml-* PyYAML-* safetensors safetensors-* psutil psutil-* fsspec fsspec-* \
  requests requests-* urllib3 urllib3-* certifi certifi-* charset_normalizer charset_normalizer-* idna idna-* \
  six.py six-* dateutil python_dateutil-* google protobuf-* msgpack msgpack-* filelock filelock-* \
  packaging packaging-* aiohttp aiohttp-* aiosignal aiosignal-* frozenlist frozenlist-* multidict multidict-* \
  yarl yarl-* propcache propcache-* aiohappyeyeballs aiohappyeyeballs-* click click-* jinja2 jinja2-* \
  markupsafe markupsafe-* MarkupSafe-* pynvml.py nvidia_ml_py-* typing_extensions.py typing_extensions-*)
mkdir -p "$root/.devpkgs"
tar -C "$work" -cf - site | xz -T2 -9e > "$root/.devpkgs/site.tar.xz"
ls -la "$root/.devpkgs/site.tar.xz"
