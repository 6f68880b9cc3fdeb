"""dicomrouter: a DICOM-native study router. A package per subsystem, in layers (each
``__init__`` says what it owns and may import; docs/architecture.md draws the order, and
tests/test_layers.py checks it): the faces (``cli``), the composition root (``app``), operations
(``web``, ``health``), the policy (``completion``, ``routing``, ``delivery``, ``sources``,
``scp``), the ways out (``destinations``, ``qrscu``, ``commitment``), durable storage (``spool``,
``state``) and the leaves (``config``, ``common``, value types, DICOM helpers, codecs).
"""
