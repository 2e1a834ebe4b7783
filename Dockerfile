# syntax=docker/dockerfile:1
# graphprune service image: `docker build -t graphprune:0.1.0 .` (see deploy/README.md).
# glibc base on purpose: onnxruntime publishes no musl (Alpine) wheels.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ---- builder: build the graphprune wheel, install it and its pinned dependencies into /opt/venv
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m pip install pip==26.3 setuptools==84.2.1 \
    && python -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install pip==26.3
WORKDIR /src
# dependencies first: this layer is reused until deploy/requirements.txt changes
COPY deploy/requirements.txt deploy/requirements.txt
RUN /opt/venv/bin/python -m pip install --only-binary=:all: -r deploy/requirements.txt
# optional extra pinned packages, e.g. --build-arg EXTRA_PACKAGES='ray[default]==X.Y.Z' for the ray overlay
ARG EXTRA_PACKAGES=""
# hadolint ignore=SC2086
RUN if [ -n "$EXTRA_PACKAGES" ]; then /opt/venv/bin/python -m pip install $EXTRA_PACKAGES; fi
COPY pyproject.toml README.md ./
COPY graphprune graphprune
COPY service service
RUN python -m pip wheel --no-deps --no-build-isolation --wheel-dir /wheels . \
    && /opt/venv/bin/python -m pip install --no-deps /wheels/graphprune-*.whl \
    && /opt/venv/bin/python -m pip check \
    && /opt/venv/bin/graphprune --version

# ---- runtime: the venv only; no compilers, no build tools, no pip cache
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GRAPHPRUNE_DATA_DIR=/data
RUN groupadd --system --gid 10001 graphprune \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin graphprune \
    && mkdir -p /data \
    && chown 10001:10001 /data
COPY --from=builder /opt/venv /opt/venv
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000
# python, not curl: the slim image has no curl. Checks the default port of CMD below.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/livez', timeout=4).status != 200)"]
ENTRYPOINT ["graphprune"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
