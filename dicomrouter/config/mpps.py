"""The MPPS keys of the configuration (issue 27 item 4), declared once here: ``ConfigModel``
inherits them (top-level keys)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import model_validator

from ..schema import Bool, Duration, Strict, parsed
from .base import ConfigError, show
from .validators import peer_names


class MppsKeys(Strict):
    """``mpps``, ``forward_mpps``, ``mpps_timeout``, ``ian``."""

    mpps: Bool = True  # answer MPPS N-CREATE / N-SET on the listeners (false: not negotiated)
    # forward every N-CREATE / N-SET, in order, to these peers (known_aes or dicom destinations)
    forward_mpps: Annotated[tuple[str, ...], parsed(peer_names)] = ()
    # a COMPLETED MPPS whose listed instances are not all in this long after it: incomplete
    mpps_timeout: Duration = 600.0
    # an Instance Availability Notification to these peers once a study completes
    ian: Annotated[tuple[str, ...], parsed(peer_names)] = ()

    @model_validator(mode="after")
    def _mpps_peers_exist(self) -> Any:
        if self.forward_mpps and not self.mpps:
            raise ConfigError("forward_mpps", "needs 'mpps: true': with mpps off the router "
                              "receives no MPPS to forward")
        if self.mpps_timeout <= 0:
            raise ConfigError("mpps_timeout", "must be more than 0")
        known = getattr(self, "known_aes", {})
        destinations = getattr(self, "destinations", {})
        for key in ("forward_mpps", "ian"):
            for name in getattr(self, key):
                if name in known or getattr(destinations.get(name), "type", None) == "dicom":
                    continue
                raise ConfigError(key, f"unknown peer {show(name)}: a known_aes AE title or "
                                  "a destination of type dicom")
        return self
