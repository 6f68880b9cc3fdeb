# dicomrouter: runs on its embedded defaults when no configuration is mounted (DICOMROUTER on
# port 11112, every study to /data/received); mount one and set DICOMROUTER_CONFIG to use it.
# The cluster extra brings boto3 (s3 destination, shared spool) and psycopg (PostgreSQL state).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY dicomrouter ./dicomrouter
RUN pip install --no-cache-dir ".[cluster]" \
 && useradd --system --uid 10001 --home-dir /data --create-home dicomrouter
USER dicomrouter
WORKDIR /data
ENV TCP_NODELAY=1
EXPOSE 11112 8080
# /health answers as long as the process serves HTTP (web.port, default 8080 on loopback)
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4)"]
CMD ["dicomrouter", "serve"]
