"""The router's HTTP side: health, Prometheus metrics, the REST API and the status page
(FastAPI served by uvicorn in a thread of ``serve``)."""
