# usam: the backend (`usam serve`) and the training worker (`usam worker`) share this image.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    USAM_MODEL_DIR=/data/models \
    USAM_CACHE_DIR=/data/cache

# OpenCV (pulled in by the tracker's dependencies) links libGL and GLib at import.
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY usam_backend ./usam_backend
COPY training ./training
COPY label_config ./label_config
RUN pip install --no-cache-dir -c constraints.txt . \
    && useradd --create-home --uid 1000 usam \
    && mkdir -p /data/models /data/cache \
    && chown -R usam /data

USER usam
VOLUME ["/data/models", "/data/cache"]
EXPOSE 9090
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/ping', timeout=4)" || exit 1
CMD ["usam", "serve", "--host", "0.0.0.0", "--port", "9090"]
