"""S3 destination: one zip per study, or one object per instance, at templated keys.

``mode: zip`` (the default) writes the study into a zip in the spool's ``tmp`` folder as the
instances are read (each member's SHA-256 computed while it is copied, for ``manifest.json``),
then uploads it at commit (a multipart upload above ``part_size``). Uploads go through obstore
when the keys are configured (``access_key_env``), else through boto3's managed transfer (the
standard AWS credential chain); boto3 also aborts the multipart uploads a crash left open.
A zip is the study: the session gets every instance of the study, also after a late arrival,
and the same key is overwritten. ``mode: instances`` uploads each instance as it comes.
Objects carry metadata: study UID, instance count, SHA-256. Credentials: the standard AWS
chain, or ``access_key_env``/``secret_key_env``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from ..common.s3 import (
    describe_failure,
    fast_put,
    fast_store,
    never_connected,
    s3_client,
    transfer_config,
)
from ..config.peers import S3Model
from ..dicomfile import read_header, render_template, text
from ..state import Instance
from .base import Context, DeliveryError, Destination, PermanentFailure, Session
from .export import StudyZip
from .registry import implements

DEFAULT_ZIP_KEY = "{PatientID}/{StudyInstanceUID}.zip"
DEFAULT_INSTANCE_KEY = "{PatientID}/{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"


# S3 error codes waiting does not change, with what the operator can do about each
S3_ACTIONS = {
    "NoSuchBucket": "create the bucket, or fix the destination's bucket name",
    "InvalidBucketName": "fix the destination's bucket name",
    "InvalidAccessKeyId": "check the access key (access_key_env / the AWS credentials)",
    "SignatureDoesNotMatch": "check the secret key (secret_key_env / the AWS credentials)",
    "AccessDenied": "give the credentials permission to write to the bucket",
}


def _error_code(exc: Exception) -> str:
    """The S3 error code of a ClientError, of one wrapped by the managed transfer (which only
    keeps its text: "An error occurred (NoSuchBucket) when calling ..."), or of an obstore
    error (which quotes the response: "<Code>NoSuchBucket</Code>")."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    m = re.search(r"An error occurred \((\w+)\)|<Code>(\w+)</Code>", str(exc))
    return (m.group(1) or m.group(2)) if m else ""


def _s3_error(exc: Exception, what: str) -> DeliveryError:
    text = f"S3 {what}: {describe_failure(exc)}"
    action = S3_ACTIONS.get(_error_code(exc))
    return PermanentFailure(text, action) if action else DeliveryError(text)


@implements(S3Model)
class S3Destination(Destination):
    def __init__(self, cfg: S3Model, ctx: Context) -> None:
        super().__init__(cfg, ctx)
        self.options = cfg
        self.mode = cfg.mode
        self.whole_study = self.mode == "zip"
        self.key = cfg.key or (DEFAULT_ZIP_KEY if self.whole_study else DEFAULT_INSTANCE_KEY)
        self.bucket = cfg.bucket

    @functools.cached_property
    def transfer(self) -> Any:
        """boto3's transfer settings, bounded (``transfer_threads``, ``part_size``)."""
        return transfer_config(self.options)

    def describe(self) -> str:
        where = self.options.endpoint_url or "AWS"
        return f"s3 {self.bucket} at {where}, {self.mode}, key {self.key}"

    def key_for(self, inst: Instance, data: BinaryIO) -> str:
        lookup = dict(inst.tags)
        missing = [k for k in _keywords(self.key) if k not in lookup]
        if missing:
            ds = read_header(data)
            data.seek(0)
            lookup.update({k: text(ds.get(k)) for k in missing})
        return render_template(self.key, lookup).as_posix()

    probe_kind = "S3 head-bucket"

    def probe(self) -> None:
        try:
            self.client().head_bucket(Bucket=self.bucket)
        except DeliveryError:
            raise
        except Exception as exc:
            raise _s3_error(exc, f"head-bucket s3://{self.bucket}") from None

    def open(self, instances: Sequence[Instance], routes: Sequence[str] = ()) -> Session:
        if self.whole_study:
            return _ZipSession(self, routes)
        return _InstanceSession(self)

    def upload(self, key: str, body: str | BinaryIO, size: int,
               metadata: dict[str, str], content_type: str | None = None) -> None:
        """Put ``body`` (a path, or a spool reader at its start) at ``key``; DeliveryError
        (PermanentFailure for what waiting cannot heal) when it fails. With ``max_rate``
        each object waits for its bytes in the destination's bucket first (paced object by
        object: the clients stream a body themselves)."""
        if self.limiter is not None:
            self.limiter.take(size)
        try:
            store = self.fast
            if store is not None:
                attributes = dict(metadata)
                if content_type:
                    attributes["Content-Type"] = content_type
                fast_put(store, key, body, size, self.options, attributes)
                return
            extra: dict[str, Any] = {"Metadata": metadata}
            if content_type:
                extra["ContentType"] = content_type
            client = self.client()
            if isinstance(body, str):
                client.upload_file(body, self.bucket, key, ExtraArgs=extra,
                                   Config=self.transfer)
            else:
                client.upload_fileobj(body, self.bucket, key, ExtraArgs=extra,
                                      Config=self.transfer)
        except DeliveryError:
            raise
        except Exception as exc:
            raise _s3_error(exc, f"upload of s3://{self.bucket}/{key}") from exc

    @functools.cached_property
    def fast(self) -> Any:
        """The obstore store uploads go through (None: boto3's)."""
        try:
            return fast_store(self.options)
        except Exception as exc:  # a secret not set, a CA bundle unreadable
            raise _s3_error(exc, "client") from None

    def client(self) -> Any:
        try:
            return s3_client(self.options)
        except DeliveryError:
            raise
        except Exception as exc:
            raise _s3_error(exc, "client") from None

    def recover(self) -> list[str]:
        """Remove the zips a crash left half built, and abort the multipart uploads it left
        open in the bucket (their parts are stored, and billed, until aborted). An upload is
        recorded in the work folder before it starts, so only this router's are aborted."""
        done: list[str] = []
        if self.workdir is None or not self.workdir.is_dir():
            return done
        zips = [p for p in self.workdir.glob("*.zip.part") if p.is_file()]
        for p in zips:
            p.unlink(missing_ok=True)
        if zips:
            done.append(f"removed {len(zips)} study zip(s) an interrupted export to "
                        f"s3://{self.bucket} left in {self.workdir}")
        for record in sorted(self.workdir.glob("upload-*.json")):
            try:
                key = json.loads(record.read_text())["key"]
                aborted = self._abort_uploads(key, record.stat().st_mtime)
            except (OSError, ValueError, KeyError) as exc:
                done.append(f"cannot read {record}: {exc}")
                record.unlink(missing_ok=True)
                continue
            except DeliveryError as exc:  # the bucket is out of reach: try at the next start
                done.append(f"could not abort an interrupted upload to s3://{self.bucket}: "
                            f"{exc}")
                continue
            record.unlink(missing_ok=True)
            if aborted:
                done.append(f"aborted {aborted} unfinished multipart upload(s) of "
                            f"s3://{self.bucket}/{key} an interrupted export left open")
        return done

    def _abort_uploads(self, key: str, not_after: float, not_before: float | None = None) -> int:
        """Abort the multipart uploads of exactly ``key`` begun before ``not_after`` (+1 min
        of clock skew; and with ``not_before``, not before it): the ones the interrupted run
        began."""
        client = self.client()
        aborted = 0
        try:
            listing = client.list_multipart_uploads(Bucket=self.bucket, Prefix=key)
            for up in listing.get("Uploads", []):
                began = up["Initiated"].timestamp()
                if up["Key"] != key or began > not_after + 60 or (
                        not_before is not None and began < not_before):
                    continue
                client.abort_multipart_upload(Bucket=self.bucket, Key=key,
                                              UploadId=up["UploadId"])
                aborted += 1
        except Exception as exc:
            raise _s3_error(exc, f"multipart uploads of s3://{self.bucket}/{key}") from None
        return aborted


def _keywords(template: str) -> list[str]:
    import re

    return re.findall(r"{([^{}]*)}", template)


class _InstanceSession(Session):
    def __init__(self, dest: S3Destination) -> None:
        self.dest = dest

    def send(self, inst: Instance, data: BinaryIO) -> bool:
        key = self.dest.key_for(inst, data)
        digest = hashlib.sha256()  # metadata goes first: this mode reads the file twice
        size = 0
        while chunk := data.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
        data.seek(0)
        self.dest.upload(key, data, size, {
            "study-instance-uid": inst.study_uid, "sop-instance-uid": inst.sop_uid,
            "sha256": digest.hexdigest()})
        return True


class _ZipSession(Session):
    """Builds the study's zip as instances arrive (in the destination's work folder on the
    spool's disk); uploads it at commit."""

    transmits_on_send = False

    def __init__(self, dest: S3Destination, routes: Sequence[str]) -> None:
        self.dest = dest
        self.routes = routes
        if dest.workdir is not None:
            dest.workdir.mkdir(parents=True, exist_ok=True)
        self.zip = StudyZip(dest.workdir)
        self.uids: list[str] = []
        self.key: str | None = None

    def send(self, inst: Instance, data: BinaryIO) -> bool:
        if self.key is None:
            self.key = self.dest.key_for(inst, data)
        self.zip.add(inst, data)
        self.uids.append(inst.sop_uid)
        return False

    def commit(self) -> Sequence[str]:
        if not self.uids or self.key is None:
            return ()
        sha256 = self.zip.finish(self.dest.name, self.routes)
        record = self._record_upload()
        self.transmitting(self.uids)
        started = time.time()
        failed = True
        try:
            self.dest.upload(self.key, str(self.zip.path), os.path.getsize(self.zip.path), {
                "study-instance-uid": self.zip.study_uid,
                "instance-count": str(len(self.uids)), "sha256": sha256}, "application/zip")
            failed = False
        except DeliveryError as exc:
            if exc.__cause__ is not None and never_connected(exc.__cause__):
                self.not_transmitted(self.uids)
            raise
        finally:
            if record is not None:
                if failed and self.dest.fast is not None:
                    # boto3 aborts a multipart upload that failed itself; obstore may leave
                    # its parts: abort them now (the record stays for the next start if not)
                    with contextlib.suppress(DeliveryError):  # this run's upload only
                        self.dest._abort_uploads(self.key, time.time(), not_before=started - 5)
                        record.unlink(missing_ok=True)
                else:
                    record.unlink(missing_ok=True)
        return self.uids

    def _record_upload(self) -> Path | None:
        """Note the key before uploading: if the process dies mid-upload, the next start
        aborts the multipart upload it left open (S3Destination.recover)."""
        if self.dest.workdir is None or self.key is None:
            return None
        record = self.dest.workdir / f"upload-{uuid.uuid4().hex}.json"
        record.write_text(json.dumps({"bucket": self.dest.bucket, "key": self.key}))
        return record

    def close(self) -> None:
        self.zip.discard()
