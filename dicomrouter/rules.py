"""Routing conditions: parsed from a route's ``when`` and evaluated on a study, with the reason.

A condition on a key holds when *any* instance of the study has a matching value (so
``Modality: CT`` reads "the study contains CT"); the conditions of a ``when`` must all hold.
Keys: any DICOM keyword or ``(gggg,eeee)`` tag, a sequence path
(``ReferringPhysicianIdentificationSequence[0].PersonIdentificationCodeSequence[0].CodeValue``;
``[*]`` or no index: any item), ``CallingAE``, ``CalledAE``, ``Source``, ``Listener``,
``Prefetch`` and ``PrefetchRule`` (a prior a prefetch rule brought), the study-level
aggregates ``ModalitiesInStudy``, ``NumberOfStudyRelatedInstances``,
``NumberOfStudyRelatedSeries``, ``SeriesDescriptions``, and the HL7 order's ``ORDER_KEYS``.

Values: a value, a list of values (any of), ``/regex/`` (``/regex/i``: ignoring case), or a
mapping of operators: ``equals``, ``in``, ``ieq`` and ``iin`` (the same, ignoring case),
``regex``, ``glob``, ``>``/``>=``/``<``/``<=`` (a number compares numerically, a string
compares as text, which orders DICOM dates and times), ``between: [low, high]``, ``exists`` /
``missing``. Groups: ``not: {...}``, ``any: [{...}, ...]``, ``all: [{...}, ...]``.

Values compare case-sensitively, after stripping surrounding spaces (DICOM pads values), unless
the condition says otherwise (``/.../i``, ``ieq``, ``iin``; ``regex: "(?i)..."``). An empty
value is no value: a key that is empty in every instance is ``missing`` and does not ``exist``,
and an equality with ``""`` holds only for a study without the value.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import tag_for_keyword

from .values import AE_PSEUDO_KEYS, ConfigError, Matcher, parse_matcher

#: values of the latest HL7 order for the study's AccessionNumber (issue 27, ``hl7:``)
ORDER_KEYS = {"OrderPriority": "priority", "OrderingFacility": "ordering_facility",
              "OrderModality": "modality", "OrderProcedureCode": "procedure_code",
              "OrderRequestedProcedureID": "requested_procedure_id",
              "OrderSendingApplication": "sending_application"}
AGGREGATES = ("ModalitiesInStudy", "NumberOfStudyRelatedInstances",
              "NumberOfStudyRelatedSeries", "SeriesDescriptions")
OPERATORS = ("equals", "in", "ieq", "iin", "regex", "glob", ">", ">=", "<", "<=", "between",
             "exists", "missing")
GROUPS = ("not", "any", "all")
TAG = re.compile(r"^\(?([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})\)?$")
STEP = re.compile(r"^(?P<name>\([0-9A-Fa-f]{4},[0-9A-Fa-f]{4}\)|[A-Za-z][A-Za-z0-9]*)"
                   r"(?:\[(?P<index>\d+|\*)\])?$")


@dataclass(frozen=True)
class Condition:
    """One node: ``op`` is an operator on ``key``, or a group (not/any/all) of ``children``."""

    op: str
    key: str = ""
    operand: Any = None
    children: tuple[Condition, ...] = ()
    matcher: Matcher | None = None  # the classic value / list / /regex/ form

    # the classic form's fields, for code written against config.Matcher
    @property
    def keyword(self) -> str:
        return self.key

    @property
    def values(self) -> tuple[str, ...]:
        return self.matcher.values if self.matcher is not None else ()

    @property
    def patterns(self) -> tuple[re.Pattern[str], ...]:
        return self.matcher.patterns if self.matcher is not None else ()

    def accepts(self, value: str) -> bool:
        return value_holds(self, value)

    def text(self) -> str:
        """The condition as written (for explanations)."""
        if self.op in GROUPS:
            inner = ", ".join(c.text() for c in self.children)
            return f"{self.op}({inner})"
        if self.matcher is not None:
            shown = [*self.matcher.values,
                     *(f"/{p.pattern}/" + ("i" if p.flags & re.IGNORECASE else "")
                       for p in self.matcher.patterns)]
            return f"{self.key} = {shown[0] if len(shown) == 1 else shown}"
        if self.op == "regex":
            return f"{self.key} regex /{self.operand.pattern}/"
        return f"{self.key} {self.op} {self.operand!r}"


# ---- parsing -----------------------------------------------------------------------------------

def _check_key(key: str, where: str, keys: Collection[str] | None = None) -> None:
    if keys is not None:  # conditions on other values than a study's (an HL7 order's fields)
        if key not in keys:
            raise ConfigError(where, f"unknown key (one of {', '.join(keys)})")
        return
    if key in AE_PSEUDO_KEYS or key in AGGREGATES or key in ORDER_KEYS:
        return
    for step in key.split("."):
        m = STEP.match(step)
        if m is None or (not TAG.match(m.group("name"))
                         and tag_for_keyword(m.group("name")) is None):
            import difflib

            from pydicom.datadict import keyword_dict

            close = difflib.get_close_matches(key, [*keyword_dict, *AE_PSEUDO_KEYS,
                                                    *AGGREGATES, *ORDER_KEYS], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(where, f"not a DICOM keyword{hint}, (gggg,eeee) tag or sequence "
                              f"path, nor one of {', '.join(AE_PSEUDO_KEYS)}, "
                              f"{', '.join(AGGREGATES)}, {', '.join(ORDER_KEYS)}")


def _operator(key: str, raw: Mapping[str, Any], where: str) -> Condition:
    if len(raw) != 1:
        raise ConfigError(where, f"one operator per condition (one of {', '.join(OPERATORS)}); "
                          "combine several with all: [...]")
    op, operand = next(iter(raw.items()))
    if op not in OPERATORS:
        raise ConfigError(f"{where}.{op}", f"unknown operator (one of {', '.join(OPERATORS)})")
    if op in ("exists", "missing") and not isinstance(operand, bool):
        raise ConfigError(f"{where}.{op}", "expected true or false")
    if op in ("in", "iin") and not (isinstance(operand, list) and operand):
        raise ConfigError(f"{where}.{op}", "expected a list of values")
    if op == "between" and not (isinstance(operand, list) and len(operand) == 2):
        raise ConfigError(f"{where}.{op}", "expected [low, high]")
    if op == "regex":
        try:
            operand = re.compile(str(operand))
        except re.error as exc:
            raise ConfigError(f"{where}.{op}", f"invalid regular expression: {exc}") from None
    if op in ("equals", "ieq", "glob") and isinstance(operand, list | dict):
        raise ConfigError(f"{where}.{op}", "expected one value")
    return Condition(op, key, tuple(operand) if isinstance(operand, list) else operand)


def parse_when(raw: Any, where: str = "when",
               check_key: Callable[[str, str], None] | None = None,
               keys: Collection[str] | None = None) -> tuple[Condition, ...]:
    """The conditions of a ``when`` mapping; ConfigError names the key that is wrong.
    ``check_key(key, where)`` validates a key (default: a DICOM keyword, tag, sequence path
    or pseudo-key; ``hl7_rules`` passes its own for HL7 fields); ``keys``: the only keys
    allowed (a prefetch rule's order fields)."""
    if check_key is None:
        def check(key: str, at: str) -> None:
            _check_key(key, at, keys)
    else:
        check = check_key
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise ConfigError(where, f"expected a mapping, got {type(raw).__name__}")
    out: list[Condition] = []
    for key, value in raw.items():
        key = str(key)
        at = f"{where}.{key}" if where else key
        if key == "not":
            out.append(Condition("not", children=(Condition("all", children=parse_when(
                value, at, check_key, keys)),)))
        elif key in ("any", "all"):
            items = value if isinstance(value, list) else None
            if not items:
                raise ConfigError(at, "expected a list of condition mappings")
            out.append(Condition(key, children=tuple(
                Condition("all", children=parse_when(item, f"{at}[{i}]", check_key, keys))
                for i, item in enumerate(items))))
        else:
            check(key, at)
            if isinstance(value, dict):
                out.append(_operator(key, value, at))
            else:
                plain = check_key is None and keys is None and key.isidentifier() \
                    and "." not in key and key not in ORDER_KEYS
                m = parse_matcher(key if plain else "PatientID", value, at)  # parses values only
                out.append(Condition("match", key, matcher=Matcher(key, m.values, m.patterns)))
    return tuple(out)


# ---- evaluation --------------------------------------------------------------------------------

def _number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def _compare(op: str, value: str, operand: Any) -> bool:
    if isinstance(operand, bool) or not value:  # an absent value is neither more nor less
        return False
    if isinstance(operand, int | float):
        number = _number(value)
        if number is None:
            return False
        a, b = number, float(operand)
    else:
        a, b = value, str(operand)  # type: ignore[assignment]
    return {">": a > b, ">=": a >= b, "<": a < b, "<=": a <= b}[op]  # type: ignore[operator]


def value_holds(c: Condition, value: str) -> bool:
    """Does one value satisfy an operator condition (not exists/missing)?"""
    v = value.strip()
    if c.matcher is not None:
        return c.matcher.accepts(v)
    if c.op == "equals":
        return v == str(c.operand)
    if c.op == "in":
        return v in {str(x) for x in c.operand}
    if c.op == "ieq":
        return v.casefold() == str(c.operand).strip().casefold()
    if c.op == "iin":
        return v.casefold() in {str(x).strip().casefold() for x in c.operand}
    if c.op == "regex":
        return bool(c.operand.search(v))
    if c.op == "glob":
        return fnmatch.fnmatchcase(v, str(c.operand))
    if c.op == "between":
        low, high = c.operand
        return _compare(">=", v, low) and _compare("<=", v, high)
    return _compare(c.op, v, c.operand)


def evaluate(c: Condition, values: Callable[[str], list[str]]) -> tuple[bool, str]:
    """(holds, why): ``values(key)`` gives every value the study has for a key."""
    if c.op == "not":
        held, why = evaluate(c.children[0], values)
        return not held, f"not ({why})"
    if c.op in ("any", "all"):
        results = [evaluate(child, values) for child in c.children]
        if c.op == "all":
            failed = [why for ok, why in results if not ok]
            return (not failed, failed[0] if failed else
                    "; ".join(why for _, why in results) or "no conditions")
        passed = [why for ok, why in results if ok]
        return (bool(passed), passed[0] if passed else
                "none of: " + " | ".join(why for _, why in results))
    found = [v for v in values(c.key) if v.strip()]
    shown = ", ".join(sorted(set(found))[:5]) or "none"
    if c.op == "exists":
        held = bool(found) == bool(c.operand)
    elif c.op == "missing":
        held = (not found) == bool(c.operand)
    else:
        held = any(value_holds(c, v) for v in (found or [""]))
    return held, f"{c.text()}: {'holds' if held else 'fails'} (study has {shown})"


def all_hold(conditions: Iterable[Condition],
             values: Callable[[str], list[str]]) -> tuple[bool, str]:
    """Every condition of a ``when`` (the first that fails decides), with the reason."""
    return evaluate(Condition("all", children=tuple(conditions)), values)


def literal_values(conditions: Iterable[Condition], key: str) -> list[str]:
    """The values ``key`` is compared to for equality anywhere in ``conditions`` (to check
    names such as a Source or Listener against the configuration)."""
    out: list[str] = []
    for c in conditions:
        if c.key == key:
            if c.matcher is not None:
                out += list(c.matcher.values)
            elif c.op == "equals":
                out.append(str(c.operand))
            elif c.op == "in":
                out += [str(v) for v in c.operand]
        out += literal_values(c.children, key)
    return out


def keys_of(conditions: Iterable[Condition]) -> set[str]:
    out: set[str] = set()
    for c in conditions:
        if c.key:
            out.add(c.key)
        out |= keys_of(c.children)
    return out


def non_monotonic(conditions: Iterable[Condition]) -> str:
    """The first condition that can hold for part of a study and fail once more instances
    are in ('' when there is none): a ``not`` group, ``missing``, ``exists: false``, or a
    value test that holds when the study has no value (it is tested against "" then).
    ``forward: immediate`` routes need conditions that, once held, hold for good."""
    for c in conditions:
        if c.op == "not":
            return "not"
        if c.op in ("any", "all"):
            found = non_monotonic(c.children)
            if found:
                return found
            continue
        if c.op == "missing" and c.operand:
            return f"{c.key}: missing"
        if c.op == "exists" and not c.operand:
            return f"{c.key}: exists: false"
        if c.op not in ("exists", "missing") and value_holds(c, ""):
            return f"{c.text()} (holds while the study has no {c.key})"
    return ""
