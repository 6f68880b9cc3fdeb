"""The router's HTTP side: health, Prometheus metrics, the REST API and the status page
(FastAPI served by uvicorn in a thread of ``serve``), and DICOMweb over the spool under
``/dicom-web`` (``qido.py`` searches, ``wado.py`` retrievals, ``media.py`` their media types)."""
