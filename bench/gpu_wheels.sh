#!/usr/bin/env bash
# Fetch, here (where PyPI is reachable), the wheels that `bench/gpu_check.sh` installs on the bare, offline GPU machine.
#
#   bash bench/gpu_wheels.sh            # -> .whl/ (git-ignored), CPython 3.12 manylinux x86_64 (the device's python3)
#   PYVER=3.11 DEST=/tmp/whl311 bash bench/gpu_wheels.sh   # same list for another interpreter (local simulation)
#
# The list is exactly what `python -m core.cli pretrain` (synthetic data, single or DeepSpeed strategy) imports and
# the GPU machine's image lacks (it has torch, numpy, scipy, opencv, pyyaml, pillow, tifffile, matplotlib, tqdm,
# psutil, msgpack, ninja, einops, py-cpuinfo, packaging, nvidia-ml-py, ...):
#   omegaconf                     recipe loading (2.4 vendors its ANTLR runtime: no antlr4-python3-runtime needed)
#   albumentations, albucore      the multi-crop augmentation (core.data.multicrop)
#   stringzilla, simsimd          compiled dependencies of albucore
#   pydantic, pydantic-core, annotated-types, typing-inspection   needed by albumentations and DeepSpeed's config
#   typing-extensions             pydantic-core needs >= 4.14.1; the device's version is not known, so bring one
#   hjson, deepspeed              the DeepSpeed strategy (deepspeed is an sdist: a py3-none-any wheel is built here)
# Versions equal those of the project's .venv. Everything is installed there with --no-deps, so a missing dependency
# shows up as an ImportError, never as a silent download attempt. Keep one version of each name in DEST: pip refuses
# to install two.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
DEST=${DEST:-.whl}
PY=${PYTHON:-python3}
# The deepspeed build imports torch (its setup.py probes the accelerator), so it runs with the project's venv.
BUILD_PY=${BUILD_PYTHON:-.venv/bin/python}
DEEPSPEED=deepspeed==0.19.8

BINARY=(pydantic-core==2.41.5 stringzilla==5.3.2 simsimd==6.5.16)
PURE=(omegaconf==2.4.0 albumentations==2.0.8 albucore==0.0.24 pydantic==2.12.5 annotated-types==0.8.0
      typing-inspection==0.4.5 typing-extensions==4.16.0 hjson==3.1.0)

# The local mirrors configured on the developer machines make pip warn once per name; those lines are noise here.
pip_quiet() {
  "$@" 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
  return "${PIPESTATUS[0]}"
}

mkdir -p "$DEST"
# Compiled wheels for the target interpreter and platform; pip matches each manylinux tag exactly, so list several.
pip_quiet "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "${BINARY[@]}"
pip_quiet "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$DEST" "${PURE[@]}"

if ! ls "$DEST"/deepspeed-*-py3-none-any.whl >/dev/null 2>&1; then
  # No DeepSpeed op is pre-built (DS_BUILD_OPS=0): the project uses torch's AdamW, so the wheel is pure Python and
  # any op the device might need is JIT-compiled there. DS_ACCELERATOR=cpu keeps the build from probing for CUDA.
  DS_BUILD_OPS=0 DS_ACCELERATOR=cpu pip_quiet "$BUILD_PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" \
    "$DEEPSPEED"
fi
for whl in "$DEST"/deepspeed-*.whl; do
  case "$whl" in
    *-py3-none-any.whl) ;;
    *) echo "gpu_wheels: $whl is not a pure-Python wheel; the device cannot build it" >&2; exit 1 ;;
  esac
done
# pip download leaves other versions in place when the pins change: refuse rather than ship two.
dupes=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dupes" ]; then
  echo "gpu_wheels: several versions of: $dupes in $DEST; delete the old ones" >&2
  exit 1
fi
ls -l "$DEST"/*.whl | awk '{printf "%9d  %s\n", $5, $NF}'
du -ch "$DEST"/*.whl | tail -1
