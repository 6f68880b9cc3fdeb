"""Configuration: one YAML file, validated by a pydantic schema (models.py), turned into the
frozen dataclasses the router reads (base.py). Every error is ``key.path: problem``."""

from __future__ import annotations

from .base import (
    AE_PSEUDO_KEYS,
    CONFIG_ENV,
    DEFAULT_AE_TITLE,
    DEFAULT_FOLDER_TEMPLATE,
    DEFAULT_PORT,
    Config,
    ConfigError,
    DestinationConfig,
    KnownAE,
    Limits,
    ListenerConfig,
    Matcher,
    RetryPolicy,
    RouteConfig,
    SourceConfig,
    TlsConfig,
    WebConfig,
    parse_duration,
    parse_size,
    study_level,
    template_keywords,
)
from .load import embedded_default, load, replace_port
from .models import DESTINATION_MODELS, DESTINATION_TYPES, from_dict

__all__ = [
    "AE_PSEUDO_KEYS", "CONFIG_ENV", "DEFAULT_AE_TITLE", "DEFAULT_FOLDER_TEMPLATE",
    "DEFAULT_PORT", "DESTINATION_MODELS", "DESTINATION_TYPES", "Config", "ConfigError",
    "DestinationConfig", "KnownAE", "Limits", "ListenerConfig", "Matcher", "RetryPolicy",
    "RouteConfig",
    "SourceConfig",
    "TlsConfig",
    "WebConfig",
    "embedded_default", "from_dict", "load", "parse_duration", "parse_size", "replace_port",
    "study_level", "template_keywords",
]
