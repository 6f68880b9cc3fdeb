"""Configuration: one YAML file, validated by the pydantic models of ``models.py`` (the router
and the peers) and ``peers.py`` (destinations, sources), which the router then reads as they
are, frozen. Every error is ``key.path: problem``. The leaves ``values.py`` (parsers) and
``schema.py`` (model building blocks) are below it; ``config`` imports no other part of the
router but the value types a configuration holds (rules, schedules, transforms, the sweep).
"""

from __future__ import annotations

from .base import (
    AE_PSEUDO_KEYS,
    CONFIG_ENV,
    DEFAULT_AE_TITLE,
    DEFAULT_FOLDER_TEMPLATE,
    DEFAULT_PORT,
    ConfigError,
    Matcher,
    parse_duration,
    parse_size,
    study_level,
    template_keywords,
)
from .load import embedded_default, load, replace_port
from .models import (
    ConfigModel,
    KnownAEModel,
    ListenerModel,
    RouteModel,
    StateModel,
    WebModel,
    from_dict,
)
from .peers import (
    DESTINATION_MODELS,
    SOURCE_MODELS,
    DestinationBase,
    RetryModel,
    SourceBase,
    TlsClientModel,
    TlsServerModel,
    destination_type,
    destination_types,
    source_type,
    source_types,
)

# The names the router's modules read the configuration by: one declaration each (the models).
Config = ConfigModel
DestinationConfig = DestinationBase
SourceConfig = SourceBase
RouteConfig = RouteModel
ListenerConfig = ListenerModel
KnownAE = KnownAEModel
TlsConfig = TlsServerModel
WebConfig = WebModel
RetryPolicy = RetryModel
Limits = ConfigModel  # the listener limits are top-level keys

__all__ = [
    "AE_PSEUDO_KEYS", "CONFIG_ENV", "DEFAULT_AE_TITLE", "DEFAULT_FOLDER_TEMPLATE",
    "DEFAULT_PORT", "DESTINATION_MODELS", "SOURCE_MODELS", "Config", "ConfigError",
    "ConfigModel", "DestinationBase", "DestinationConfig", "KnownAE", "KnownAEModel", "Limits",
    "ListenerConfig", "ListenerModel", "Matcher", "RetryModel", "RetryPolicy", "RouteConfig",
    "RouteModel", "SourceBase", "SourceConfig", "StateModel", "TlsClientModel", "TlsConfig",
    "TlsServerModel", "WebConfig", "WebModel", "destination_type", "destination_types",
    "embedded_default", "from_dict", "load", "parse_duration", "parse_size", "replace_port",
    "source_type", "source_types", "study_level", "template_keywords",
]
