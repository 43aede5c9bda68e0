#!/usr/bin/env bash
# Build lorasweep with CUDA + NCCL on this GPU-less machine, for the lent H200 (sm_90).
#
# Usage:
#   deploy/cuda/build.sh                 # release build of the lorasweep binary, stripped,
#                                        # packed as target-cuda/lorasweep.xz for a device call
#   deploy/cuda/build.sh --check         # cargo check --release --workspace --all-targets
#                                        # with cuda,nccl (CI: type-checks the GPU code paths
#                                        # without linking; build scripts still run, so nvcc
#                                        # compiles candle-kernels once per target dir)
#   deploy/cuda/build.sh -p CRATE        # release build of one crate only (e.g. to warm the
#                                        # cache with lorasweep-engine); no packing
#   Extra arguments after `--` go to cargo.
#
# Everything goes to target-cuda/ (never target/, so it never fights the CPU build). Cargo and
# nvcc run under `nice -n 19` with CARGO_BUILD_JOBS=2 and CUDAFORGE_THREADS=2 (override either
# through the environment) so other builds on the machine stay responsive.
# --check uses the release profile on purpose: build-script output is shared with the release
# build, so candle-kernels' nvcc step (the slow part) runs once for both.
# Cold release build measured here on 2 busy cores: 23 min, of which candle-kernels' build
# script took 15.5 min (1 min of PTX, 14.5 min of GGUF/MoE kernels into libmoe.a).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$REPO/deploy/cuda"

mode=release
package=
extra=()
while [[ $# -gt 0 ]]; do
	case "$1" in
	--check) mode=check ;;
	-p | --package)
		[[ $# -ge 2 ]] || {
			echo "build.sh: error: $1 needs a crate name" >&2
			exit 2
		}
		package="$2"
		shift
		;;
	--)
		shift
		extra=("$@")
		break
		;;
	-h | --help)
		sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
		exit 0
		;;
	*)
		echo "build.sh: error: unknown argument '$1' (see --help)" >&2
		exit 2
		;;
	esac
	shift
done

eval "$("$HERE/setup-toolkit.sh")"

export CARGO_TARGET_DIR="$REPO/target-cuda"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-2}"
cd "$REPO"

started=$(date +%s)
elapsed() { echo "$(($(date +%s) - started))s"; }

if [[ $mode == check ]]; then
	nice -n 19 cargo check --release --workspace --all-targets --features cuda,nccl "${extra[@]}"
	echo "build.sh: cuda check passed in $(elapsed)" >&2
	exit 0
fi

if [[ -n $package && $package != lorasweep ]]; then
	nice -n 19 cargo build --release -p "$package" --features cuda,nccl "${extra[@]}"
	echo "build.sh: built $package (release, cuda,nccl) in $(elapsed)" >&2
	exit 0
fi

# --workspace, like --check: build-dependency features (and so candle-kernels' build script
# and its nvcc output) are resolved over the packages selected; the same selection shares them.
nice -n 19 cargo build --release --workspace --features cuda,nccl "${extra[@]}"
built=$(elapsed)

bin="$CARGO_TARGET_DIR/release/lorasweep"
stripped="$CARGO_TARGET_DIR/lorasweep"
packed="$CARGO_TARGET_DIR/lorasweep.xz"
cp "$bin" "$stripped.tmp"
strip "$stripped.tmp"
mv "$stripped.tmp" "$stripped"
nice -n 19 xz -T2 -c "$stripped" >"$packed.tmp"
mv "$packed.tmp" "$packed"

size() { du -h "$1" | cut -f1; }
echo "build.sh: cargo build ${built}; stripped $(size "$stripped"), packed $(size "$packed") in $(elapsed) total" >&2
echo "build.sh: carry 'target-cuda/lorasweep.xz' and run: deploy/cuda/run-on-device.sh lorasweep ARGS..." >&2
echo "$packed"
