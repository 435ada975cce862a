#!/usr/bin/env bash
# Build the CUDA binary of runner on a machine without a GPU (see ../shared/PERFORMANCE.md):
# NVIDIA's CUDA 13.0 compiler and libraries from PyPI into a folder outside the repository,
# unversioned .so symlinks, a stub libcuda.so.1 for the link, CUDA_COMPUTE_CAP=90 (H100/H200).
# Not part of CI: a clean build takes about 15 minutes (the kernels compile on one thread).
#
#   scripts/build-cuda.sh [TOOLKIT_DIR]      (default: ../cuda-toolkit beside the repository)
#
# The binary lands in target/release/runner (built with --features cuda; a stripped copy in
# target/cuda/runner) and needs libcuda, cudart, cublas and curand 13 at run time.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
toolkit="${1:-$repo/../cuda-toolkit}"
mkdir -p "$toolkit"
toolkit="$(cd "$toolkit" && pwd)"

if [ ! -x "$toolkit/py/nvidia/cu13/bin/nvcc" ]; then
  echo "installing the CUDA 13.0 toolkit wheels into $toolkit/py"
  python3 -m pip install --quiet --no-deps --target "$toolkit/py" \
    'nvidia-cuda-nvcc==13.0.*' 'nvidia-cuda-crt==13.0.*' 'nvidia-nvvm==13.0.*' \
    'nvidia-cuda-cccl==13.0.*' 'nvidia-cuda-runtime==13.0.*' 'nvidia-cuda-nvrtc==13.0.*' \
    'nvidia-cublas==13.0.*' 'nvidia-curand==10.4.0.*'
fi
cuda="$toolkit/py/nvidia/cu13"
[ -x "$cuda/bin/nvcc" ] || { echo "error: no nvcc under $cuda/bin" >&2; exit 1; }

# The wheels ship only versioned libraries (libcudart.so.13 ...): add the names the linker asks for.
for lib in "$cuda"/lib/lib*.so.*; do
  base="${lib%%.so.*}.so"
  [ -e "$base" ] || ln -s "$(basename "$lib")" "$base"
done

stub="$toolkit/stub"
export CUDA_ROOT="$cuda" CUDA_PATH="$cuda" CUDA_HOME="$cuda"
export PATH="$cuda/bin:$PATH"
export CUDA_COMPUTE_CAP=90
export LIBRARY_PATH="$cuda/lib:$stub${LIBRARY_PATH:+:$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$cuda/lib:$stub${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$cuda/lib -L native=$stub"

cd "$repo"
target="${CARGO_TARGET_DIR:-$repo/target}"
# First everything but the final link (the library and its dependencies)...
cargo build --release --features cuda --lib

# ...then a stub libcuda.so.1 that defines every driver-API symbol cudarc links against, so
# the executable links here; on the GPU machine the real driver library is loaded instead.
mkdir -p "$stub"
nm "$target"/release/deps/libcudarc-*.rlib 2>/dev/null |
  awk '$1 == "U" && $2 ~ /^cu[A-Z]/ { print "int " $2 "(void) { return 999; }" }' | sort -u > "$stub/stub.c"
[ -s "$stub/stub.c" ] || { echo "error: found no driver symbols in cudarc's rlib" >&2; exit 1; }
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub/libcuda.so.1" "$stub/stub.c"
ln -sf libcuda.so.1 "$stub/libcuda.so"

cargo build --release --features cuda --bin runner
# A stripped copy inside the repository's ignored target/ (about 56 MB): small enough to carry
# to a GPU machine with the working tree; scripts/gpu-check.sh takes it as RUNNER_BIN.
mkdir -p "$repo/target/cuda"
strip -o "$repo/target/cuda/runner" "$target/release/runner"
ls -l "$repo/target/cuda/runner"
echo "built $target/release/runner with CUDA (compute capability 9.0); stripped copy: target/cuda/runner"
