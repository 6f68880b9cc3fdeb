"""The Q/R proxy's keys (README "Q/R proxy"), top-level keys of the configuration declared
here (``ConfigModel`` inherits them) so ``models.py`` stays one screenful per job."""

from __future__ import annotations

from typing import Any

from pydantic import model_validator

from ..schema import Duration, Int, Strict, Text
from ..values import ConfigError


class ProxyKeys(Strict):
    """``query_retrieve_proxy``: a ``known_aes`` entry or a ``dicomweb`` source's name."""

    query_retrieve_proxy: Text | None = None
    query_retrieve_proxy_timeout: Duration = 30.0  # association / response / HTTP at the PACS
    query_retrieve_proxy_max_answers: Int(1, 10_000_000) = 10_000  # C-FIND answers taken
    query_retrieve_proxy_cache: Duration = 86400.0  # a fetched study stays this long unused
    # studies fetched at once for WADO-RS (a request for one already coming joins it)
    query_retrieve_proxy_max_fetches: Int(1, 1000) = 4

    @model_validator(mode="after")
    def _known_pacs(self) -> Any:
        """The PACS is a ``known_aes`` entry (DICOM Q/R) or a ``dicomweb`` source (QIDO-RS /
        WADO-RS)."""
        name = self.query_retrieve_proxy
        known_aes: dict[str, Any] = getattr(self, "known_aes", {})
        sources: dict[str, Any] = getattr(self, "sources", {})
        if name is None or name in known_aes:
            return self
        source = sources.get(name)
        if source is not None and source.type == "dicomweb":
            return self
        if source is not None:
            raise ConfigError("query_retrieve_proxy", f"source {name!r} is of type "
                              f"{source.type}: only a dicomweb source (or a known_aes entry) "
                              "can be the PACS")
        known = [*known_aes, *(n for n, s in sources.items() if s.type == "dicomweb")]
        raise ConfigError("query_retrieve_proxy", f"{name!r} is neither in known_aes nor a "
                          f"dicomweb source (known: {', '.join(known) or 'none'})")
