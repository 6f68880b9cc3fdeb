"""The model of ``prefetch:`` rules (prior prefetch, issue 27 item 3): a trigger (a new study
matching ``when``, or an HL7 order matching ``when`` on the order's fields), the peer holding
the priors (``from``: a ``known_aes`` entry or a dicom / dicomweb source), which priors (same
PatientID, ``max_studies``, ``max_age``, ``modalities``, ``body_parts``) and where they go
(``to``: a route ``prefetch <name>`` on ``PrefetchRule`` is generated for them, so the priors
are routed like any study, beside the table's own routes)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import Field, model_validator

from ..rules import literal_values, parse_when
from ..schema import Bool, Choice, Duration, Int, Strict, Text, parsed
from .base import ConfigError, parse_duration, show
from .peers import RetryModel
from .validators import to_value

#: the keys of an HL7 order (``Prefetcher.on_order``), what ``when`` of a ``trigger: order`` rule
#: may test
ORDER_FIELDS = ("message_type", "patient_id", "issuer", "patient_name", "birth_date", "sex",
                "accession", "requested_procedure_id", "modality", "scheduled", "study_uid",
                "sending_application", "sending_facility", "control_id")
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(y|w)\s*$")


def age_value(value: Any, key: str) -> float | None:
    """``max_age``: ``5y`` (365 days a year), ``26w``, ``180d``, ``12h``... in seconds."""
    if value is None:
        return None
    m = _AGE.match(value) if isinstance(value, str) else None
    if m:
        return float(m.group(1)) * (365 if m.group(2) == "y" else 7) * 86400.0
    try:
        return parse_duration(value, key)
    except ConfigError:
        raise ConfigError(key, f"expected an age like 5y, 26w, 180d, got {show(value)}") \
            from None


def _upper_list(value: Any, key: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) and v.strip() for v in items):
        raise ConfigError(key, f"expected a list of values, got {show(value)}")
    return tuple(dict.fromkeys(v.strip().upper() for v in items))


def _when(value: Any, key: str) -> Any:
    """Kept raw here: its keys depend on ``on`` (DICOM keys for a study, order fields for an
    order); parsed by the model below."""
    if value is not None and not isinstance(value, dict):
        raise ConfigError(key, f"expected a mapping, got {type(value).__name__}")
    return value


class PrefetchModel(Strict):
    """One entry of ``prefetch:``."""

    name: Text
    trigger: Choice("study", "order") = "study"  # a new study, or an HL7 order
    when: Annotated[Any, parsed(_when)] = None
    from_: Text = Field(alias="from")  # a known_aes AE title, or a dicom/dicomweb source
    to: Annotated[tuple[str, ...], parsed(to_value)]
    max_studies: Int(1, 1000) = 3  # the most recent N priors that pass the filters
    max_age: Annotated[float | None, parsed(age_value)] = None  # no older than (StudyDate)
    modalities: Annotated[tuple[str, ...], parsed(_upper_list)] = ()  # ModalitiesInStudy
    body_parts: Annotated[tuple[str, ...], parsed(_upper_list)] = ()  # BodyPartExamined
    retrieve: Choice("move", "get") = "move"  # C-MOVE to the router's AE, or C-GET
    query_model: Choice("study", "patient") = "study"
    check_held: Bool = True  # C-FIND dicom destinations: a prior they hold whole is skipped
    suppress_for: Duration = 3600.0  # a trigger for the same patient this soon: nothing
    timeout: Duration = 60.0  # association set-up, and between two responses (DICOM, HTTP)
    retry: RetryModel = RetryModel()  # a failed prefetch is tried again with this backoff

    @model_validator(mode="after")
    def _conditions(self) -> PrefetchModel:
        keys = ORDER_FIELDS if self.trigger == "order" else None
        object.__setattr__(self, "when", parse_when(self.when, "when", keys=keys))
        if self.timeout <= 0:
            raise ConfigError("timeout", "must be more than 0")
        return self

    @property
    def source(self) -> str:
        """``from``: where the priors are queried and retrieved."""
        return self.from_

    def describe(self) -> str:
        which = [f"the {self.max_studies} most recent"]
        if self.modalities:
            which.append("/".join(self.modalities))
        if self.body_parts:
            which.append("/".join(self.body_parts))
        text = " ".join(which) + " prior(s)"
        if self.max_age is not None:
            text += f" of the last {self.max_age / 86400:g} day(s)"
        return f"on a new {self.trigger}: {text} from {self.from_} → {', '.join(self.to)}"


def order_trigger_key(order: Mapping[str, Any]) -> str:
    """The trigger key of an HL7 order: its control id (MSH-10), else its accession. It is
    also the history key of the order's prefetch decisions when the order names no Study
    Instance UID (``explain --study`` of the study that arrives with the accession reads it)."""
    control = str(order.get("control_id") or "").strip()
    accession = str(order.get("accession") or "").strip()
    patient = str(order.get("patient_id") or "").strip()
    return "order:" + (control or accession or f"{patient}/{order.get('scheduled', '')}")


def check_prefetch(rules: tuple[PrefetchModel, ...], known_aes: dict[str, Any],
                   sources: dict[str, Any], destinations: dict[str, Any]) -> None:
    """Names unique, ``from`` and ``to`` name what the configuration defines."""
    names: set[str] = set()
    for i, rule in enumerate(rules):
        where = f"prefetch[{i}]"
        if rule.name in names:
            raise ConfigError(f"{where}.name", f"{show(rule.name)} is used twice")
        names.add(rule.name)
        src = sources.get(rule.from_)
        if rule.from_ not in known_aes and (src is None or src.type not in ("dicom",
                                                                            "dicomweb")):
            raise ConfigError(f"{where}.from", f"{show(rule.from_)} is neither a known_aes "
                              f"entry ({', '.join(known_aes) or 'none'}) nor a dicom or "
                              f"dicomweb source ({', '.join(sources) or 'none'})")
        for dest in rule.to:
            if dest not in destinations:
                raise ConfigError(f"{where}.to", f"unknown destination {show(dest)} (known: "
                                  f"{', '.join(destinations) or 'none defined'})")


def prefetch_routes(rules: tuple[PrefetchModel, ...], route_model: Any) -> tuple[Any, ...]:
    """One route per rule, ``prefetch <name>`` on ``PrefetchRule: <name>`` to its ``to``:
    the priors go through the routing table like any study."""
    return tuple(route_model.model_validate({"name": f"prefetch {r.name}",
                                             "when": {"PrefetchRule": r.name},
                                             "to": list(r.to)}) for r in rules)


def resolve_prefetch(cfg: Any, route_model: Any) -> Any:
    """The whole configuration's check of its ``prefetch`` rules, and their routes put in
    front of the routing table (``cfg`` was just made by this validation)."""
    check_prefetch(cfg.prefetch, cfg.known_aes, cfg.sources, cfg.destinations)
    names = {r.name for r in cfg.prefetch}
    for i, route in enumerate(cfg.routes):
        wrong = [v for v in literal_values(route.when, "PrefetchRule") if v not in names]
        if wrong:
            raise ConfigError(f"routes[{i}].when.PrefetchRule", f"unknown prefetch rule "
                              f"{show(wrong[0])} (rules: {', '.join(sorted(names)) or 'none'})")
    object.__setattr__(cfg, "routes", (*prefetch_routes(cfg.prefetch, route_model),
                                       *cfg.routes))
    return cfg


__all__ = ["ORDER_FIELDS", "PrefetchModel", "age_value", "check_prefetch", "order_trigger_key",
           "prefetch_routes", "resolve_prefetch"]
