"""The one interface every destination implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from ..config import DestinationConfig
from ..state import Instance


class DeliveryError(Exception):
    """The destination cannot take anything now (unreachable, refused the association...).

    The job fails as a whole and is retried later.
    """


class InstanceRejected(Exception):
    """This one instance was refused (a failure status); the others may still go."""


class Session(ABC):
    """One delivery batch: for a network destination, one association."""

    @abstractmethod
    def send(self, inst: Instance) -> None:
        """Deliver one instance, or raise InstanceRejected / DeliveryError."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """End the batch (release the association)."""

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Destination(ABC):
    """A place studies are delivered to; built from its validated config."""

    #: how many sessions may send parts of one study at the same time (dicom: ``associations``)
    associations: int = 1

    def __init__(self, cfg: DestinationConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name

    @abstractmethod
    def open(self, instances: Sequence[Instance]) -> Session:
        """Start a batch for these instances (contexts are negotiated from them up front)."""

    def describe(self) -> str:
        return self.cfg.type
