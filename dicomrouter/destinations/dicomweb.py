"""DICOMweb destination: STOW-RS to a DICOMweb root (Orthanc's plugin, a cloud PACS).

The HTTP session comes from dicomweb-client (basic auth, or a bearer token); the STOW-RS body is
ours: dicomweb-client's ``store_instances`` takes decoded pydicom datasets, so a 2 GB study
would be held in memory. Here each request is a ``multipart/related`` body streamed from the
spool files (a file-like with a known length, so no chunked encoding, which some servers
refuse), bounded by ``batch_size`` instances and ``batch_bytes``.

The response is read instance by instance (PS3.18 10.5.3): ReferencedSOPSequence items are
delivered; FailedSOPSequence items are refused with their Failure Reason; a 409 refuses the
batch's instances with the server's reasons; 401/403, 5xx and connection errors fail the job
(retried with backoff). Secrets come from the environment or a file, are never logged.

``parallel_requests: N`` sets ``associations``: the delivery worker splits a study into N
contiguous parts, each sent by a session of its own (its own ``requests.Session``, which is not
thread-safe, and its own batches), so N requests are in flight at once and at most N bodies are
being streamed. Each session reports what its responses confirm through ``durable`` as they
come, so when one request fails the others' instances stay recorded and the retry sends only
the rest.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

import requests

from ..common.http import http_session, request_failure
from ..common.secrets import SecretUnavailable
from ..config.peers import DicomwebModel
from ..ratelimit import TokenBucket
from ..state import Instance
from .base import Context, DeliveryError, Destination, PermanentFailure, Session
from .registry import implements

REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
SOP_INSTANCE_UID = "00080018"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"
FAILURE_REASONS = {0xA700: "out of resources", 0xA900: "data set does not match SOP class",
                   0xC000: "cannot understand", 0x0110: "processing failure",
                   0x0122: "SOP class not supported", 0xA770: "out of resources (storage)",
                   0xC122: "referenced SOP class not supported"}


class _MultipartBody:
    """A ``multipart/related; type="application/dicom"`` body read part by part from the
    spool, with its length known up front (requests sends it with a Content-Length)."""

    def __init__(self, parts: Sequence[tuple[Callable[[], BinaryIO], int]], boundary: str,
                 limiter: TokenBucket | None = None) -> None:
        self._parts = list(parts)
        self._limiter = limiter  # the destination's max_rate: paced as requests reads
        self._head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        self._tail = f"--{boundary}--\r\n".encode()
        self.len = sum(len(self._head) + size + 2 for _open, size in self._parts) + \
            len(self._tail)
        self._chunks = self._generate()
        self._pending = b""

    def __len__(self) -> int:
        return self.len

    def _generate(self):  # type: ignore[no-untyped-def]
        for open_part, size in self._parts:
            yield self._head
            with open_part() as f:
                remaining = size
                while remaining > 0:
                    chunk = f.read(min(1 << 20, remaining))
                    if not chunk:
                        raise DeliveryError("a spool file shrank while it was being sent")
                    remaining -= len(chunk)
                    yield chunk
            yield b"\r\n"
        yield self._tail

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            out = self._pending + b"".join(self._chunks)
            self._pending = b""
            if self._limiter is not None:
                self._limiter.take(len(out))
            return out
        while len(self._pending) < n:
            try:
                self._pending += next(self._chunks)
            except StopIteration:
                break
        out, self._pending = self._pending[:n], self._pending[n:]
        if self._limiter is not None:
            self._limiter.take(len(out))
        return out


@implements(DicomwebModel)
class DicomwebDestination(Destination):
    def __init__(self, cfg: DicomwebModel, ctx: Context) -> None:
        super().__init__(cfg, ctx)
        self.url = cfg.url.rstrip("/")
        self.options = cfg
        self.associations = cfg.parallel_requests

    def describe(self) -> str:
        o = self.options
        auth = " (basic auth)" if o.username else \
            " (bearer token)" if o.token_env or o.token_file else ""
        parallel = f", {self.associations} requests in flight per study" \
            if self.associations > 1 else ""
        return (f"dicomweb {self.url}{auth}, STOW-RS batches of up to "
                f"{o.batch_size} instances / {o.batch_bytes} bytes{parallel}")

    probe_kind = "HTTP HEAD"

    def probe(self) -> None:
        """Any HTTP answer to a HEAD of the DICOMweb root but a server error is the server
        back (501 and 405 too: it answers, it just has no HEAD there)."""
        with self.session() as http:
            try:
                rsp = http.head(self.url, timeout=self.options.timeout)
            except requests.RequestException as exc:
                raise DeliveryError(f"HEAD {request_failure(exc, self.url)}") from None
        if rsp.status_code >= 500 and rsp.status_code != 501:
            raise DeliveryError(f"HEAD {self.url}: HTTP {rsp.status_code} {rsp.reason}")

    def session(self) -> requests.Session:
        try:
            return http_session(self.options)
        except SecretUnavailable as exc:
            raise DeliveryError(str(exc)) from None

    def open(self, instances: Sequence[Instance], routes: Sequence[str] = ()) -> Session:
        # a new HTTP session each time: the parts of a study are sent from several threads
        return _StowSession(self, self.session())


# 4xx answers waiting does not change (408 timeout and 429 too many requests are retried;
# 400 and 409 carry a per-instance response), with what the operator can do about each
HTTP_ACTIONS = {
    401: "check the credentials (username / password_env / token_env)",
    403: "check the credentials and the account's permission to store",
    404: "check the destination's url (the server's DICOMweb base, e.g. .../dicom-web)",
    405: "check the destination's url (the server's DICOMweb base, e.g. .../dicom-web)",
    413: "lower batch_bytes / batch_size, or raise the server's request size limit",
    415: "the server does not take application/dicom: check that it is a DICOMweb server",
}


def _connection_never_made(exc: requests.RequestException) -> bool:
    """The request failed before a byte of it left: no connection could be made."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    text = str(exc)
    return isinstance(exc, requests.exceptions.ConnectionError) and (
        "NewConnectionError" in text or "Failed to establish a new connection" in text
        or "Failed to resolve" in text or "Name or service not known" in text)


class _StowSession(Session):
    """Buffers instances (their spool readers' ``reopen``) and posts them in bounded batches;
    what each response confirms is reported durable at once (verified by QIDO-RS first with
    ``verify: qido``)."""

    transmits_on_send = False

    def __init__(self, dest: DicomwebDestination, http: requests.Session) -> None:
        self.dest = dest
        self.http = http
        self.batch: list[tuple[Instance, Callable[[], BinaryIO], int]] = []
        self.batch_bytes = 0
        self.confirmed: list[str] = []
        self.refused: dict[str, str] = {}
        self.requests = 0

    def send(self, inst: Instance, data: BinaryIO) -> bool:
        size = os.fstat(data.fileno()).st_size
        o = self.dest.options
        if self.batch and (len(self.batch) >= o.batch_size
                           or self.batch_bytes + size > o.batch_bytes):
            self._post()
        self.batch.append((inst, data.reopen, size))  # type: ignore[attr-defined]
        self.batch_bytes += size
        return False

    def commit(self) -> Sequence[str]:
        if self.batch:
            self._post()
        return self.confirmed

    def close(self) -> None:
        self.http.close()

    def _post(self) -> None:
        batch, self.batch, self.batch_bytes = self.batch, [], 0
        boundary = uuid.uuid4().hex
        body = _MultipartBody([(reopen, size) for _inst, reopen, size in batch], boundary,
                              self.dest.limiter)
        url = f"{self.dest.url}/studies"
        headers = {"Content-Type": f'multipart/related; type="application/dicom"; '
                                   f"boundary={boundary}",
                   "Accept": "application/dicom+json"}
        uids = [inst.sop_uid for inst, _r, _s in batch]
        self.transmitting(uids)
        try:
            rsp = self.http.post(url, data=body, headers=headers,
                                 timeout=self.dest.options.timeout)
        except requests.RequestException as exc:
            if _connection_never_made(exc):
                self.not_transmitted(uids)
            raise DeliveryError(f"STOW-RS to {request_failure(exc, url)}") from None
        self.requests += 1
        if rsp.status_code in HTTP_ACTIONS or (
                400 <= rsp.status_code < 500 and rsp.status_code not in (400, 408, 409, 429)):
            raise PermanentFailure(
                f"STOW-RS to {url}: HTTP {rsp.status_code} {rsp.reason}"
                + (f": {rsp.text[:200]}" if rsp.status_code not in (401, 403) else ""),
                HTTP_ACTIONS.get(rsp.status_code, "see the server's log for why it refuses"))
        if rsp.status_code >= 500 or rsp.status_code not in (200, 202, 400, 409):
            raise DeliveryError(f"STOW-RS to {url}: HTTP {rsp.status_code} {rsp.reason}: "
                                f"{rsp.text[:300]}")
        delivered, failed = _parse(rsp)
        accepted = []
        for uid in uids:
            if uid in delivered and uid not in failed:
                accepted.append(uid)
            else:
                self.refused[uid] = failed.get(uid) or \
                    f"HTTP {rsp.status_code}: not in the STOW-RS response's referenced instances"
        if accepted and self.dest.options.verify == "qido":
            held = self._stored(batch[0][0].study_uid)
            for uid in [u for u in accepted if u not in held]:
                self.refused[uid] = ("accepted but not stored: the server answered success, "
                                     "yet its QIDO-RS does not list the instance")
            accepted = [u for u in accepted if u in held]
        self.confirmed += accepted
        self.durable(accepted)  # recorded now: a later batch failing does not forget them

    def _stored(self, study_uid: str) -> set[str]:
        """The SOP Instance UIDs the server lists for the study (QIDO-RS, instance level)."""
        url = f"{self.dest.url}/studies/{study_uid}/instances"
        try:
            rsp = self.http.get(url, params={"includefield": SOP_INSTANCE_UID},
                                headers={"Accept": "application/dicom+json"},
                                timeout=self.dest.options.timeout)
        except requests.RequestException as exc:
            raise DeliveryError(f"QIDO-RS (verify) at {request_failure(exc, url)}") from None
        if rsp.status_code == 204 or (rsp.status_code == 404 and not rsp.content):
            return set()
        if rsp.status_code != 200:
            raise DeliveryError(f"QIDO-RS (verify) {url}: HTTP {rsp.status_code} {rsp.reason}")
        try:
            rows = rsp.json() if rsp.content else []
        except ValueError:
            raise DeliveryError(f"QIDO-RS (verify) {url}: not JSON") from None
        return {str(((r.get(SOP_INSTANCE_UID) or {}).get("Value") or [""])[0])
                for r in rows if isinstance(r, dict)}


def _parse(rsp: requests.Response) -> tuple[set[str], dict[str, str]]:
    """(delivered SOP Instance UIDs, failed UID → reason) from a STOW-RS response."""
    try:
        body = rsp.json() if rsp.content else {}
    except ValueError:
        return set(), {}
    if isinstance(body, list):
        body = body[0] if body else {}

    def items(tag: str) -> list[dict[str, Any]]:
        return list((body.get(tag) or {}).get("Value") or [])

    def value(item: dict[str, Any], tag: str) -> Any:
        values = (item.get(tag) or {}).get("Value") or [None]
        return values[0]

    delivered = {str(value(i, REFERENCED_SOP_INSTANCE_UID)) for i in items(REFERENCED_SOP_SEQUENCE)}
    failed = {}
    for item in items(FAILED_SOP_SEQUENCE):
        code = value(item, FAILURE_REASON)
        reason = FAILURE_REASONS.get(code, "failure") if isinstance(code, int) else "failure"
        failed[str(value(item, REFERENCED_SOP_INSTANCE_UID))] = \
            f"HTTP {rsp.status_code}: STOW-RS failure reason 0x{code or 0:04X} ({reason})"
    return delivered, failed
