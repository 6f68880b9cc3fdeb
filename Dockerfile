FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY dicomrouter ./dicomrouter
RUN pip install --no-cache-dir .
WORKDIR /data
EXPOSE 11112
ENV DICOMROUTER_CONFIG=/etc/dicomrouter/router.yml
CMD ["dicomrouter", "serve"]
