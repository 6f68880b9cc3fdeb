"""The configuration's constants, and the value parsers of ``values.py`` re-exported where
callers look for them (``config.ConfigError``, ``config.parse_duration``...)."""

from __future__ import annotations

from ..values import (  # noqa: F401 - re-exported: config.X is where callers look
    AE_PSEUDO_KEYS,
    ConfigError,
    Matcher,
    is_loopback,
    parse_ae_title,
    parse_bool,
    parse_choice,
    parse_duration,
    parse_int,
    parse_matcher,
    parse_size,
    parse_str,
    parse_transfer_syntaxes,
    regex_literal,
    show,
    study_level,
    template_keywords,
)

DEFAULT_AE_TITLE = "DICOMROUTER"
DEFAULT_PORT = 11112
CONFIG_ENV = "DICOMROUTER_CONFIG"


DEFAULT_FOLDER_TEMPLATE = "{PatientID}/{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"
