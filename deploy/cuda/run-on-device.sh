#!/usr/bin/env bash
# Run a command on the GPU machine with the lorasweep CUDA build ready to use.
#
# Build here with deploy/cuda/build.sh, then in a device call carry `target-cuda/lorasweep.xz`
# and run, from the repository root:
#   deploy/cuda/run-on-device.sh lorasweep bench train --geometry smollm2-135m ...
#   deploy/cuda/run-on-device.sh python3 bench/peft_baseline.py --geometry smollm2-135m ...
#   deploy/cuda/run-on-device.sh bash -c 'lorasweep ... && python3 ...'
#
# It unpacks the binary (once per new archive) into ${LORASWEEP_BIN_DIR:-/tmp/lorasweep-bin}
# (a later call on the same machine that carries no archive uses the unpacked one),
# puts that directory first on PATH, points LD_LIBRARY_PATH at the driver
# (/usr/local/nvidia/lib64), the toolkit (/usr/local/cuda/lib64) and NCCL from python3's
# nvidia.nccl package, keeps NVLink multicast off, and execs the arguments.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ARCHIVE="${LORASWEEP_ARCHIVE:-$REPO/target-cuda/lorasweep.xz}"
BIN_DIR="${LORASWEEP_BIN_DIR:-/tmp/lorasweep-bin}"

die() {
	printf 'run-on-device: error: %s\n' "$*" >&2
	exit 1
}

[[ $# -gt 0 ]] || die "no command given (e.g. run-on-device.sh lorasweep bench train ...)"

# NVLink multicast can take the host's shared GPUs out of service: keep it off everywhere.
export NCCL_NVLS_ENABLE=0
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export NVSHMEM_DISABLE_NVLS=1

libs=()
[[ -d /usr/local/nvidia/lib64 ]] && libs+=(/usr/local/nvidia/lib64)
[[ -d /usr/local/cuda/lib64 ]] && libs+=(/usr/local/cuda/lib64)
nccl_dir="$(python3 - <<'PY' 2>/dev/null || true
import os
import nvidia
for root in nvidia.__path__:
    lib = os.path.join(root, "nccl", "lib")
    if os.path.isfile(os.path.join(lib, "libnccl.so.2")):
        print(lib)
        break
PY
)"
if [[ -n $nccl_dir ]]; then
	libs+=("$nccl_dir")
else
	echo "run-on-device: warning: python3 has no nvidia.nccl package; libnccl.so.2 may not resolve" >&2
fi
joined="$(
	IFS=:
	echo "${libs[*]}"
)"
export LD_LIBRARY_PATH="$joined${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

if [[ -f $ARCHIVE ]]; then
	mkdir -p "$BIN_DIR"
	if [[ ! -x $BIN_DIR/lorasweep || $ARCHIVE -nt $BIN_DIR/lorasweep ]]; then
		xz -dc -T0 "$ARCHIVE" >"$BIN_DIR/lorasweep.tmp"
		chmod +x "$BIN_DIR/lorasweep.tmp"
		mv "$BIN_DIR/lorasweep.tmp" "$BIN_DIR/lorasweep"
	fi
	export PATH="$BIN_DIR:$PATH"
	if missing="$(ldd "$BIN_DIR/lorasweep" 2>&1 | grep 'not found')"; then
		echo "run-on-device: warning: unresolved libraries for lorasweep:" >&2
		echo "$missing" >&2
	fi
elif [[ -x $BIN_DIR/lorasweep ]]; then
	# A call that follows a carrying one closely finds the binary it unpacked.
	export PATH="$BIN_DIR:$PATH"
elif [[ $1 == lorasweep || $1 == bash ]]; then
	die "$ARCHIVE not found and nothing unpacked in $BIN_DIR: build it with deploy/cuda/build.sh and carry target-cuda/lorasweep.xz"
fi

exec "$@"
