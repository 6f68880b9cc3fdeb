"""QIDO-RS (PS3.18 10.6) over what the spool holds: the same index, the same matching and the
same checks as the C-FIND SCP (``query.parse`` → ``State.qr_rows``), so a query means one thing
whichever way it arrives.

The query parameters become a C-FIND identifier: each ``{attribute}={value}`` (keyword or tag)
a key with its value (UID lists with ``,`` or ``\\``; repeated parameters are a list), each
``includefield`` a key to return (``all``: every attribute the index holds). Refused with 400:
a name that is no DICOM attribute, an attribute the index does not match on, a value its VR
does not allow (the C-FIND 0xA900 cases), ``fuzzymatching=true``, a bad ``limit``/``offset``.
At most ``max_query_results`` answers per request; when more match, a ``Warning: 299`` header
says so (page on with ``offset``). Answers are ``application/dicom+json`` built with pydicom's
``Dataset.to_json_dict``, each with its RetrieveURL.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset

from .. import query

log = logging.getLogger("dicomrouter.dicomweb")

DICOM_JSON = "application/dicom+json"
#: What each level returns without includefield (PS3.18 Tables 10.6.3-3 to -5, as far as the
#: index holds it); a query at a lower level returns the levels above it too.
DEFAULTS = {
    "STUDY": ("StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
              "ReferringPhysicianName", "PatientName", "PatientID", "PatientBirthDate",
              "PatientSex", "StudyInstanceUID", "StudyID", "StudyDescription",
              "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"),
    "SERIES": ("Modality", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber",
               "NumberOfSeriesRelatedInstances"),
    "IMAGE": ("SOPClassUID", "SOPInstanceUID", "InstanceNumber"),
}
_JSON_TYPES = frozenset({DICOM_JSON, "application/json", "*/*", "application/*"})
_CONTROL = frozenset({"includefield", "limit", "offset", "fuzzymatching"})
_AT_LEVEL = {"STUDY": ("STUDY",), "SERIES": ("STUDY", "SERIES"),
             "IMAGE": ("STUDY", "SERIES", "IMAGE")}


def attribute(name: str) -> str:
    """The keyword of a QIDO attribute name (keyword or ``ggggeeee``); 400 if it is none."""
    name = name.strip()
    kw = ""
    if len(name) == 8 and all(c in "0123456789abcdefABCDEF" for c in name):
        kw = keyword_for_tag(int(name, 16)) or ""
    elif tag_for_keyword(name) is not None:
        kw = name
    if not kw:
        raise HTTPException(400, f"{name[:80]!r} is not a DICOM attribute (a keyword such as "
                            "PatientID, or a tag such as 00100020)")
    return kw


def identifier(level: str, params: list[tuple[str, str]], fixed: dict[str, str]) -> Dataset:
    """The C-FIND identifier of a QIDO request (``fixed``: the UIDs of the path)."""
    values: dict[str, list[str]] = {}
    include: list[str] = []
    for name, value in params:
        if name == "fuzzymatching":
            if value.strip().lower() == "true":
                raise HTTPException(400, "fuzzymatching=true is not supported: Person Names "
                                    "match case-insensitively, with * and ? wildcards")
            continue
        if name == "includefield":
            for f in value.split(","):
                if f.strip().lower() == "all":
                    include += [k for k, lvl in query.ATTRIBUTES.items()
                                if lvl in _AT_LEVEL[level]]
                elif f.strip():
                    include.append(attribute(f))
            continue
        if name in _CONTROL:
            continue
        kw = attribute(name)
        if kw not in query.ATTRIBUTES or kw in query.AGGREGATES:
            matched = sorted(set(query.ATTRIBUTES) - query.AGGREGATES)
            raise HTTPException(400, f"{kw}: the router does not match on this attribute "
                                f"(it matches on {', '.join(matched)})")
        values.setdefault(kw, []).append(value)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = level
    keys = [k for lvl in _AT_LEVEL[level] for k in DEFAULTS[lvl]]
    for kw in dict.fromkeys([*keys, *fixed, *values, *include]):
        if kw not in query.ATTRIBUTES:
            continue  # a public attribute the index does not hold: not returned
        vr = dictionary_VR(kw)
        given = values.get(kw, [])
        if vr == "UI":
            given = [u for v in given for u in v.replace("\\", ",").split(",")]
        if kw in fixed:
            given = [fixed[kw]]
        ds.add_new(tag_for_keyword(kw), vr, "\\".join(given) if given else None)
    return ds


def search(router_view: Any, request: Request, level: str, fixed: dict[str, str]
           ) -> JSONResponse:
    """Answer one QIDO-RS request at ``level`` (``fixed``: UIDs of the path)."""
    accept = request.headers.get("accept", "")
    if accept and not any(t.split(";")[0].strip().lower() in _JSON_TYPES
                          for t in accept.split(",")):
        raise HTTPException(406, f"QIDO-RS answers in {DICOM_JSON} only (asked: "
                            f"{accept[:200]})")
    params = [(k, v) for k, v in request.query_params.multi_items()]
    limit, offset = _number(params, "limit"), _number(params, "offset")
    ds = identifier(level, params, fixed)
    try:
        q = query.parse(ds)
    except query.QueryError as exc:
        raise HTTPException(400, str(exc)) from None
    most = router_view.cfg.limits.max_query_results
    take = min(limit or most, most)
    rows = router_view.state.qr_rows(q, take + 1, offset)
    more = len(rows) > take
    rows = rows[:take]
    root = service_root(request)
    answers = []
    for row in rows:
        answer = query.response(q, row)
        del answer.QueryRetrieveLevel
        answer.RetrieveURL = retrieve_url(root, level, row)
        answers.append(answer.to_json_dict())
    headers = {}
    if more and (not limit or limit > most):
        headers["Warning"] = ('299 dicomrouter: "There are additional results that can be '
                              f'requested (max_query_results is {most}; use offset)"')
    log.info("QIDO-RS from %s: %s → %d match(es)%s", request.client.host if request.client
             else "?", query.describe(q), len(answers), " (more left)" if more else "")
    return JSONResponse(answers, media_type=DICOM_JSON, headers=headers)


def _number(params: list[tuple[str, str]], name: str) -> int:
    given = [v for k, v in params if k == name]
    if not given:
        return 0
    value = given[-1].strip()
    if not value.isdigit() or len(value) > 12:
        raise HTTPException(400, f"{name}={value[:40]!r}: a whole number ≥ 0 is expected")
    return int(value)


def service_root(request: Request) -> str:
    """The DICOMweb service's base URL: the request's URL up to ``/studies``, ``/series`` or
    ``/instances`` (so it holds wherever the routes are mounted)."""
    url = str(request.url).split("?", 1)[0]
    path = request.url.path
    for part in ("/studies", "/series", "/instances"):
        at = path.find(part)
        if at >= 0:
            return url[:len(url) - len(path) + at]
    return url


def retrieve_url(root: str, level: str, row: dict[str, str]) -> str:
    url = f"{root}/studies/{row.get('StudyInstanceUID', '')}"
    if level in ("SERIES", "IMAGE"):
        url += f"/series/{row.get('SeriesInstanceUID', '')}"
    if level == "IMAGE":
        url += f"/instances/{row.get('SOPInstanceUID', '')}"
    return url


def add_routes(api: APIRouter, router_view: Any, auth: Callable[..., Any]) -> None:
    """The QIDO-RS resources on ``api`` (at its root: ``/studies``, ``/series``, ...)."""
    deps = [Depends(auth)]

    @api.get("/studies", dependencies=deps, summary="QIDO-RS: search for studies")
    def studies(request: Request) -> JSONResponse:
        return search(router_view, request, "STUDY", {})

    @api.get("/series", dependencies=deps, summary="QIDO-RS: search for series")
    def all_series(request: Request) -> JSONResponse:
        return search(router_view, request, "SERIES", {})

    @api.get("/instances", dependencies=deps, summary="QIDO-RS: search for instances")
    def all_instances(request: Request) -> JSONResponse:
        return search(router_view, request, "IMAGE", {})

    @api.get("/studies/{study}/series", dependencies=deps,
             summary="QIDO-RS: search for a study's series")
    def series(study: str, request: Request) -> JSONResponse:
        return search(router_view, request, "SERIES", {"StudyInstanceUID": study})

    @api.get("/studies/{study}/instances", dependencies=deps,
             summary="QIDO-RS: search for a study's instances")
    def study_instances(study: str, request: Request) -> JSONResponse:
        return search(router_view, request, "IMAGE", {"StudyInstanceUID": study})

    @api.get("/studies/{study}/series/{series_uid}/instances", dependencies=deps,
             summary="QIDO-RS: search for a series' instances")
    def instances(study: str, series_uid: str, request: Request) -> JSONResponse:
        return search(router_view, request, "IMAGE",
                      {"StudyInstanceUID": study, "SeriesInstanceUID": series_uid})
