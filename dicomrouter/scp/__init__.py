"""Everything that answers: the storage receivers (the lean listener, ``listener.py`` with
``association.py``, and pynetdicom's, ``server.py``), the one ingest contract both use
(``ingest.py``), and the services handed to pynetdicom on the same port: Query/Retrieve
(``qr.py``, ``retrieve.py``) and storage commitment (registered by ``services.py``). May import
the spool, the state, config and the leaves (``dimse``, ``dicomfile``, ``walk``); never
delivery, completion or the faces.
"""
