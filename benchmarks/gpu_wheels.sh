#!/usr/bin/env bash
# Download the wheels the GPU machine lacks (benchmarks/gpu_requirements.txt) into .whl/,
# for its Python 3.12 on x86-64 Linux; then check them: one wheel per name, and with
# --check, install them the way the device does into a temporary folder and import them
# with a local Python 3.12 (numpy fetched beside them, as the device has its own).
#
#     bash benchmarks/gpu_wheels.sh            # download into .whl/ (needs the registry)
#     bash benchmarks/gpu_wheels.sh --check    # also install and import with python3.12
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-python3 -m pip}
platforms=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms="$platforms --platform $p"
done
mkdir -p .whl
requirements() { sed 's/#.*//' benchmarks/gpu_requirements.txt | grep -v '^ *$' | tr -d ' '; }
for requirement in $(requirements); do
    $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms -d .whl "$requirement"
done
# each wheel's Requires-Dist (extras left out) must be what gpu_requirements.txt records as its needs
norm() { tr -d '\r' | tr 'A-Z_.' 'a-z--' | sort -u | tr '\n' ' '; }
for requirement in $(requirements); do
    name=${requirement%%==*}
    wheel=$(ls .whl/*.whl | grep -i "/$(echo "$name" | tr '-' '_')-${requirement#*==}-")
    actual=$(unzip -p "$wheel" '*.dist-info/METADATA' | { grep '^Requires-Dist' || true; } | { grep -v 'extra ==' || true; } | sed 's/^Requires-Dist: *//; s/[ ;<>=!~\[(].*//' | norm)
    recorded=$(grep "^$name==" benchmarks/gpu_requirements.txt | sed 's/.*needs://' | tr ' ' '\n' | { grep -v '^$' || true; } | norm)
    if [ "$actual" != "$recorded" ]; then
        echo "$name: the wheel needs '$actual', gpu_requirements.txt records '$recorded'" >&2
        exit 1
    fi
done
# one wheel per distribution: two versions of one stop the device's install
dupes=$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dupes" ]; then
    echo "more than one wheel of: $dupes (remove the old ones from .whl/)" >&2
    exit 1
fi
echo "wheels in .whl/: $(ls .whl/*.whl | wc -l), $(du -cm .whl/*.whl | tail -1 | cut -f1) MiB"
if [ "${1:-}" = "--check" ]; then
    py312=${PY312:-python3.12}
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms -d "$tmp/device" numpy pyyaml typing_extensions packaging
    "$py312" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$tmp/site" .whl/*.whl "$tmp"/device/*.whl
    PYTHONPATH="$tmp/site" "$py312" -c "
import pycocotools.mask, zarr, numcodecs, imagecodecs, tifffile, importlib.metadata as m
import numpy as np
rle = pycocotools.mask.encode(np.asfortranarray(np.eye(8, dtype=np.uint8)))
assert pycocotools.mask.area(rle) == 8
z = zarr.zeros((4, 4)); z[:] = 1; assert z[:].sum() == 16
assert imagecodecs.lzw_decode(imagecodecs.lzw_encode(b'abc')) == b'abc'
print('imported with Python', __import__('sys').version.split()[0], '-', ', '.join(f'{n} {m.version(n)}' for n in ('segment-anything', 'pycocotools', 'zarr', 'imagecodecs', 'tifffile')))
"
fi
