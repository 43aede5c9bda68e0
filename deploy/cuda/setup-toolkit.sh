#!/usr/bin/env bash
# Build a CUDA 13.0 toolkit for compiling lorasweep with `--features cuda,nccl` on a machine
# that has no GPU and no system CUDA: the compiler and libraries come from pinned PyPI wheels,
# and the driver library is a link-time stub.
#
# Usage:
#   deploy/cuda/setup-toolkit.sh            # set up (idempotent), then print env exports
#   eval "$(deploy/cuda/setup-toolkit.sh)"  # set up and export into the current shell
#
# Where: ${LORASWEEP_CUDA_DIR:-<repo>/.cuda} (git-ignored). Layout:
#   venv/          python venv holding the wheels
#   home/          CUDA_HOME made of symlinks: bin, nvvm, include (+ nccl.h), lib64 (+ stubs/)
#   stub/          generated libcuda stub source
#   .ready         stamp: present when the set-up for the pinned versions below is complete
#
# Progress goes to stderr; stdout carries only the `export` lines.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CUDA_DIR="${LORASWEEP_CUDA_DIR:-$REPO/.cuda}"
PYTHON="${PYTHON:-python3}"

# Newer nvcc emits PTX that the 580 driver on the GPU machine cannot JIT: keep these exact.
WHEELS=(
	nvidia-cuda-nvcc==13.0.88
	nvidia-cuda-crt==13.0.88
	nvidia-nvvm==13.0.88
	nvidia-cuda-runtime==13.0.48
	nvidia-cublas==13.0.0.19
	nvidia-curand==10.4.0.35
	nvidia-cuda-nvrtc==13.0.48
	nvidia-cuda-cccl==13.0.85
	nvidia-nccl-cu13==2.27.7
)
# Bump when the layout this script makes changes, so old set-ups are redone.
LAYOUT_VERSION=1
STAMP_TEXT="layout=$LAYOUT_VERSION ${WHEELS[*]}"

VENV="$CUDA_DIR/venv"
HOME_DIR="$CUDA_DIR/home"
STAMP="$CUDA_DIR/.ready"

log() { printf 'setup-toolkit: %s\n' "$*" >&2; }
die() {
	printf 'setup-toolkit: error: %s\n' "$*" >&2
	exit 1
}

print_exports() {
	cat <<EOF
export CUDA_HOME='$HOME_DIR'
export CUDA_PATH='$HOME_DIR'
export PATH='$HOME_DIR/bin':"\$PATH"
export CUDA_COMPUTE_CAP=90
export LD_LIBRARY_PATH='$HOME_DIR/lib64:$HOME_DIR/lib64/stubs'"\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
EOF
}

# Fast path: everything in place for exactly these pins.
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_TEXT" && -x "$HOME_DIR/bin/nvcc" &&
	-f "$HOME_DIR/lib64/stubs/libcuda.so" && -f "$HOME_DIR/include/nccl.h" ]]; then
	print_exports
	exit 0
fi

command -v "$PYTHON" >/dev/null || die "no '$PYTHON' on PATH (set PYTHON=...)"
command -v gcc >/dev/null || die "gcc is needed to build the libcuda stub"

rm -f "$STAMP"
mkdir -p "$CUDA_DIR"

if [[ ! -x "$VENV/bin/python" ]]; then
	log "creating venv $VENV"
	"$PYTHON" -m venv "$VENV"
fi
log "installing pinned CUDA 13.0 wheels (first time: ~1.5 GiB download)"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input "${WHEELS[@]}" >&2

SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
CU="$SITE/nvidia/cu13"
NCCL="$SITE/nvidia/nccl"
[[ -x "$CU/bin/nvcc" ]] || die "nvcc not found at $CU/bin/nvcc after install"
[[ -f "$CU/include/cuda.h" ]] || die "cuda.h not found at $CU/include/cuda.h after install"
[[ -f "$NCCL/include/nccl.h" ]] || die "nccl.h not found at $NCCL/include/nccl.h after install"

log "assembling CUDA_HOME at $HOME_DIR"
rm -rf "$HOME_DIR"
mkdir -p "$HOME_DIR/include" "$HOME_DIR/lib64/stubs"
ln -s "$CU/bin" "$HOME_DIR/bin"
if [[ -d "$CU/nvvm" ]]; then
	ln -s "$CU/nvvm" "$HOME_DIR/nvvm"
else
	die "nvvm not found at $CU/nvvm after install"
fi

# Headers: every entry of the toolkit's include dir, then NCCL's.
for src in "$CU/include"/* "$NCCL/include"/*; do
	ln -sfn "$src" "$HOME_DIR/include/$(basename "$src")"
done

# Libraries: every .so*/.a, plus the unversioned development name for each versioned .so.
for libdir in "$CU/lib" "$NCCL/lib"; do
	[[ -d "$libdir" ]] || continue
	for src in "$libdir"/*.so* "$libdir"/*.a; do
		[[ -e "$src" ]] || continue
		name="$(basename "$src")"
		ln -sfn "$src" "$HOME_DIR/lib64/$name"
		if [[ "$name" =~ ^(.+\.so)\.[0-9.]+$ ]]; then
			dev="${BASH_REMATCH[1]}"
			# Prefer the shortest versioned name (libx.so.13 over libx.so.13.0.0).
			current="$(readlink "$HOME_DIR/lib64/$dev" 2>/dev/null || true)"
			if [[ -z "$current" || ${#name} -lt ${#current} ]]; then
				ln -sfn "$name" "$HOME_DIR/lib64/$dev"
			fi
		fi
	done
done
for need in libcudart.so libcublas.so libcublasLt.so libcurand.so libnvrtc.so libnccl.so; do
	[[ -e "$HOME_DIR/lib64/$need" ]] || die "$need missing from $HOME_DIR/lib64 after install"
done

# The driver library ships with the driver, not with any wheel. For linking only, build a stub
# with the real soname that exports every cu* entry point of cuda.h; each returns
# CUDA_ERROR_NO_DEVICE, so a binary accidentally run against it fails cleanly.
log "generating libcuda stub from cuda.h"
STUB_DIR="$CUDA_DIR/stub"
mkdir -p "$STUB_DIR"
"$VENV/bin/python" - "$CU/include" "$STUB_DIR/libcuda_stub.c" <<'PY'
import re
import subprocess
import sys

include, out = sys.argv[1], sys.argv[2]
header = f"{include}/cuda.h"
# A declaration in cuda.h looks like `CUresult CUDAAPI cuName(`. The raw header gives the
# legacy names; preprocessing maps them to the versioned ones (cuMemAlloc -> cuMemAlloc_v2),
# and the per-thread-stream variant gives the _ptds/_ptsz names. The real driver exports all.
decl = re.compile(r"\bCUresult\s+(?:CUDAAPI\s+)?(cu[A-Za-z0-9_]+)\s*\(")
names = set(decl.findall(open(header, encoding="utf-8").read()))
for extra in ([], ["-DCUDA_API_PER_THREAD_DEFAULT_STREAM=1"]):
    text = subprocess.run(
        ["gcc", "-E", "-P", "-x", "c", f"-I{include}", *extra, header],
        check=True, capture_output=True, text=True,
    ).stdout
    names.update(decl.findall(text))
    # After preprocessing CUDAAPI is gone; `CUresult cuName(` is matched by the same pattern.
if len(names) < 300:
    sys.exit(f"only {len(names)} cu* functions found in {header}: parser out of date")
with open(out, "w", encoding="utf-8") as f:
    f.write("/* Generated by deploy/cuda/setup-toolkit.sh from cuda.h: link-time stub only. */\n")
    f.write("#define CUDA_ERROR_NO_DEVICE 100\n")
    for name in sorted(names):
        f.write(f"int {name}(void) {{ return CUDA_ERROR_NO_DEVICE; }}\n")
print(f"setup-toolkit: {len(names)} stub symbols", file=sys.stderr)
PY
gcc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$HOME_DIR/lib64/stubs/libcuda.so" "$STUB_DIR/libcuda_stub.c"
exported="$(nm -D --defined-only "$HOME_DIR/lib64/stubs/libcuda.so")"
for sym in cuInit cuDeviceGet cuMemAlloc_v2 cuModuleLoadData cuLaunchKernel cuCtxCreate_v4; do
	grep -qw "$sym" <<<"$exported" || die "stub libcuda.so lacks $sym"
done

"$HOME_DIR/bin/nvcc" --version | grep -q 'release 13.0' || die "nvcc is not release 13.0"

printf '%s' "$STAMP_TEXT" >"$STAMP"
log "ready: $HOME_DIR"
print_exports
