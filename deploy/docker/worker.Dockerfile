# syntax=docker/dockerfile:1
# The worker image: the CUDA + NCCL build of lorasweep (deploy/cuda/build.sh) on NVIDIA's CUDA
# 13.0 runtime image, which brings libcudart, libcublas and libcurand; libnccl2 is added if
# the base lacks it. libcuda.so.1 (the driver) is mounted at run time by the NVIDIA container
# toolkit. Python 3 with pip and venv is there because packaged models and task data are pip
# packages fetched into $LORASWEEP_HOME, and the code task runs Python.
# Kernels are built for sm_90a (Hopper: H100/H200). Matches deploy/k8s: user 10001, the
# asset cache on /cache, scratch on /scratch, the token at /etc/lorasweep/token/token.
#
# From the repository root (BuildKit; worker.Dockerfile.dockerignore keeps the context to
# the one binary):
#   deploy/cuda/build.sh            # writes the stripped binary target-cuda/lorasweep
#   docker build -f deploy/docker/worker.Dockerfile -t lorasweep-worker .
FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-pip python3-venv ca-certificates \
    && if ! ldconfig -p | grep -q 'libnccl\.so\.2 '; then \
        apt-get install -y --no-install-recommends libnccl2; \
    fi \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 lorasweep \
    && useradd --uid 10001 --gid 10001 --home-dir /scratch/home --no-create-home \
        --shell /usr/sbin/nologin lorasweep \
    && mkdir -p /cache /scratch/home /etc/lorasweep/token \
    && chown 10001:10001 /cache /scratch /scratch/home

COPY --chmod=0755 target-cuda/lorasweep /usr/local/bin/lorasweep

# Every library but the driver's must resolve inside the image.
RUN missing="$(ldd /usr/local/bin/lorasweep | grep 'not found' | grep -v 'libcuda\.so\.1' || true)"; \
    if [ -n "$missing" ]; then echo "unresolved libraries: $missing" >&2; exit 1; fi

ENV LORASWEEP_HOME=/cache \
    HOME=/scratch/home \
    NCCL_NVLS_ENABLE=0
USER 10001:10001
WORKDIR /scratch
ENTRYPOINT ["/usr/local/bin/lorasweep"]
CMD ["worker", "--coordinator=http://lorasweep-coordinator:7070", \
     "--token-file=/etc/lorasweep/token/token", "--gpus=0", "--work-dir=/scratch/work"]
