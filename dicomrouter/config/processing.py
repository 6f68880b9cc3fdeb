"""The models of a route's processing steps (issue 29, items 1 and 2): ``process:`` (a list
of steps, each a ``command`` or a ``container``) and ``results:`` (where the steps' output
instances go). The checks that need the rest of the configuration (named result
destinations exist, ``return_to_sender`` has ``known_aes`` to find the sender's address)
are in ``check_processing``, called once every route and destination is validated."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import model_validator

from ..schema import Choice, Duration, Size, Strict, Text, parsed
from .base import ConfigError, parse_size, show
from .peers import DESTINATION_MODELS, DestinationBase

#: placeholders a step's command line may use (the work folder's parts)
PLACEHOLDERS = ("{input}", "{output}", "{task}", "{work}")
#: ``results:`` entries that are not destination names
RESULT_TARGETS = ("return_to_sender", "origin_destinations")
ENGINES = ("docker", "podman")
KINDS = ("command", "container", "remote")
MATCHES = ("study", "referenced")


class ContainerModel(Strict):
    """``container:`` the step's program is a container image run by Docker or Podman."""

    image: Text
    engine: Choice(*ENGINES) = "docker"
    #: the container's network: none by default (an AI model has no business calling out)
    network: Text = "none"
    #: the command inside the image (default: the image's own entrypoint and command)
    args: list[Text] = []


class RemoteModel(Strict):
    """``remote:`` the study goes to an AI node (any configured destination) and the step
    waits for the results it sends back to the router."""

    destination: Text
    #: how results are recognised: ``study`` (the Study Instance UID that was sent: the
    #: pseudonymized one when the route de-identifies reversibly, which is how the mapping
    #: leads back) or ``referenced`` (also a result in a study of its own that references the
    #: study or a series that was sent)
    match: Choice(*MATCHES) = "study"
    #: the AE titles (or STOW-RS users/endpoints: whatever the study's sender is) results
    #: come from; by default any sender but the one of the study itself
    results_from: list[Text] = []


class StepModel(Strict):
    """One processing step: ``command`` (a program on this machine), ``container`` or
    ``remote`` (an AI node reached through a destination)."""

    name: Text | None = None
    command: list[Text] | None = None
    container: ContainerModel | None = None
    remote: RemoteModel | None = None
    # the step is killed (its whole process group) after this; a remote step fails when no
    # result has come back by then
    timeout: Duration = 600.0
    cpu_time: Duration | None = None  # RLIMIT_CPU of the program (seconds of CPU)
    memory: Size | None = None  # RLIMIT_AS of the program (bytes of address space)
    # stdout/stderr kept for the history, each (the rest is counted, not kept)
    max_output: Annotated[int, parsed(parse_size, 1024, 1 << 30)] = 65536

    @model_validator(mode="after")
    def _one_kind(self) -> StepModel:
        kinds = [k for k in KINDS if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ConfigError("command", "a step is exactly one of command, container or "
                              "remote" + (f" (got {' and '.join(kinds)})" if kinds else ""))
        if self.command is not None and not self.command:
            raise ConfigError("command", "an empty command line")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)


class ProcessModel(DestinationBase):
    """The destination a route with ``process:`` adds for itself (``process:<route>``; not a
    type a configuration names): its jobs run the route's steps on the study, so retries,
    backoff, the dead letter and status are the delivery ones."""

    type: str = "process"
    route: Text


PROCESS_PREFIX = "process:"
RETURN_PREFIX = "return:"


def process_destination(route: str) -> str:
    return f"{PROCESS_PREFIX}{route}"


def return_destination(ae: str) -> str:
    return f"{RETURN_PREFIX}{ae}"


#: studies at once through a chain of remote steps only (``process_concurrency`` unset): a
#: remote step mostly waits for the node, and a worker waiting on one study must not hold the
#: next studies back for up to its ``timeout``; a step on this machine takes its CPU (or GPU)
#: and runs one study at a time
REMOTE_CONCURRENCY = 4


def default_concurrency(route: Any) -> int:
    """A processing route's studies at once when ``process_concurrency`` is not given."""
    return REMOTE_CONCURRENCY if all(s.remote is not None for s in route.process) else 1


def check_processing(cfg: Any) -> Any:
    """Every route's ``results:`` names what exists; ``results:`` only beside ``process:``.
    Then each processing route gets its ``process:<route>`` destination (added to its
    ``to``), and each of ``known_aes`` a ``return:<AE>`` one when a route returns results
    to the sender."""
    _check(cfg)
    added: dict[str, DestinationBase] = {}
    routes = []
    for i, r in enumerate(cfg.routes):
        if not r.process:
            routes.append(r)
            continue
        name = process_destination(r.name or f"route {i + 1}")
        model = ProcessModel(route=r.name or f"route {i + 1}",
                             concurrency=r.process_concurrency or default_concurrency(r))
        model._name = name
        added[name] = model
        routes.append(r.model_copy(update={"to": (*(r.to or ()), name)}))
        if "return_to_sender" in r.results:
            for ae, known in cfg.known_aes.items():
                back = DESTINATION_MODELS["dicom"].model_validate(
                    {"type": "dicom", "ae_title": str(ae), "host": known.host,
                     "port": known.port, "calling_ae_title": known.calling_ae})
                back._name = return_destination(str(ae))
                added[back._name] = back
    if added:
        object.__setattr__(cfg, "destinations", {**cfg.destinations, **added})
        object.__setattr__(cfg, "routes", tuple(routes))
    return cfg


def _check(cfg: Any) -> None:
    known = cfg.destinations or {}
    for i, r in enumerate(cfg.routes):
        where = f"routes[{i}]"
        if r.process and r.forward == "immediate":
            raise ConfigError(f"{where}.process", "not with forward: immediate: a step "
                              "processes the study whole, once it is complete")
        if r.process and r.level == "series":
            raise ConfigError(f"{where}.process", "not with level: series: a step processes "
                              "the study whole, once it is complete")
        if r.process_concurrency is not None and not r.process:
            raise ConfigError(f"{where}.process_concurrency", "goes with process:")
        if r.results and not r.process:
            raise ConfigError(f"{where}.results", "results of what? results: goes with "
                              "process:")
        for j, target in enumerate(r.results):
            if target in RESULT_TARGETS or target in known:
                if target == "return_to_sender" and not cfg.known_aes:
                    raise ConfigError(f"{where}.results[{j}]", "return_to_sender needs "
                                      "known_aes: the sender's address is looked up there")
                continue
            raise ConfigError(f"{where}.results[{j}]", f"unknown destination {show(target)} "
                              f"(known: {', '.join([*RESULT_TARGETS, *known])})")
        for j, step in enumerate(r.process):
            if step.name is not None and [s.name for s in r.process].count(step.name) > 1:
                raise ConfigError(f"{where}.process[{j}].name", f"{show(step.name)} twice")
            if step.remote is not None and step.remote.destination not in known:
                raise ConfigError(f"{where}.process[{j}].remote.destination",
                                  f"unknown destination {show(step.remote.destination)} "
                                  f"(known: {', '.join(known) or 'none'})")


def step_name(step: StepModel, index: int) -> str:
    """The step's name in the history and its work folder: its ``name`` or ``step N``."""
    return step.name or f"step {index + 1}"
