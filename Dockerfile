# The syncbit image: the package and its command on Debian slim, with FUSE 3.
#
#   docker build -t ghcr.io/syncbit/syncbit:0.1.0 .
#
# Needs BuildKit (Docker 23+, or buildah/podman) for `RUN --mount`.
#
# One image for every role (`syncbit daemon`, `syncbit scheduler`, the client commands);
# deploy/k8s picks the role with the container's args. It runs as root by default
# because the node daemon mounts FUSE; every other pod in deploy/k8s sets a non-root user.
# Debian 12 (bookworm) and Python 3.11, as on the project's own machines. syncbit speaks
# the FUSE kernel protocol itself: no libfuse headers, no compiler.

# -- build: wheels for the package and every dependency (all pure Python or manylinux)
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY syncbit ./syncbit
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# -- runtime: fuse3 brings fusermount3 (the daemon's preStop and its stale-mount cleanup
# use it); tini is PID 1, forwards SIGTERM and reaps.
FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends fuse3 tini \
 && rm -rf /var/lib/apt/lists/*
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index /wheels/*.whl
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
ENTRYPOINT ["/usr/bin/tini", "--", "syncbit"]
CMD ["--help"]
