# syntax=docker/dockerfile:1
# AlignedServe images, two targets of one file (building needs a Docker engine / BuildKit):
#
#   docker build --target runtime -t ghcr.io/alignedserve/alignedserve:0.1.0 .
#       router, batcher and operator: python:3.12-slim, no torch (they never import it)
#   docker build --target gpu -t ghcr.io/alignedserve/alignedserve:0.1.0-gpu .
#       every role, the model worker included: a CUDA PyTorch image plus `.[worker]`
#
# The Helm chart runs the operator from `runtime` and gives AlignedServe pods the `-gpu` tag
# (values: defaultWorkloadImage). Both run as uid/gid 10001, the chart's runAsUser.

ARG PYTHON_IMAGE=python:3.12-slim
# Any CUDA build of torch >= 2.4 that matches the nodes' driver; the worker extra keeps it.
ARG TORCH_IMAGE=pytorch/pytorch:2.11.0-cuda13.0-cudnn9-runtime

# --- build: one wheel of the project (pure Python), shared by both targets -------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md ./
COPY services services
COPY operator operator
RUN pip wheel --no-deps --wheel-dir /wheels .

# --- runtime: router, batcher, operator (no torch) --------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --gid 10001 alignedserve \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin alignedserve
COPY --from=build /wheels /wheels
# The base dependencies only: torch is the `worker` extra, not installed here.
RUN pip install /wheels/alignedserve-*.whl && rm -rf /wheels
USER 10001:10001
ENTRYPOINT ["alignedserve"]
CMD ["--help"]

# --- gpu: the model worker (and every other role) on CUDA -------------------------------------
FROM ${TORCH_IMAGE} AS gpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --gid 10001 alignedserve \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin alignedserve
COPY --from=build /wheels /wheels
# Triton compiles the worker's kernels here (the user has no home); the operator mounts a
# volume over it that outlives the worker container
ENV TRITON_CACHE_DIR=/var/cache/alignedserve/triton
RUN install -d -o 10001 -g 10001 /var/cache/alignedserve
# Triton builds each kernel's launcher with gcc or clang at run time (into that cache); CUDA
# runtime images have shipped without a compiler (pytorch/pytorch#116696)
RUN if ! command -v gcc >/dev/null && ! command -v clang >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
      && rm -rf /var/lib/apt/lists/*; \
    fi
# `.[worker]`: torch >= 2.4 is already in the base image, so pip keeps its CUDA build.
RUN wheel="$(ls /wheels/alignedserve-*.whl)" \
 && pip install "${wheel}[worker]" \
 && python -c "import torch; assert torch.version.cuda, 'the base image lost its CUDA torch'" \
 && rm -rf /wheels
USER 10001:10001
ENTRYPOINT ["alignedserve"]
CMD ["--help"]
