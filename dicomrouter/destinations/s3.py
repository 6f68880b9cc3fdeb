"""S3 destination (boto3): one zip per study, or one object per instance, at templated keys.

``mode: zip`` (the default) writes the study into a zip in the spool's ``tmp`` folder as the
instances are read (each member's SHA-256 computed while it is copied, for ``manifest.json``),
then uploads it with boto3's managed (multipart) transfer at commit. A zip is the study: the
session gets every instance of the study, also after a late arrival, and the same key is
overwritten. ``mode: instances`` uploads each instance as it comes. Objects carry metadata:
study UID, instance count, SHA-256. Credentials: the standard AWS chain, or
``access_key_env``/``secret_key_env``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from ..dicomfile import read_header, render_template, text
from ..state import Instance
from .base import DeliveryError, Destination, PermanentFailure, Session, secret
from .export import StudyZip

DEFAULT_ZIP_KEY = "{PatientID}/{StudyInstanceUID}.zip"
DEFAULT_INSTANCE_KEY = "{PatientID}/{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"


def _client(options: dict[str, Any]) -> Any:
    import boto3
    from botocore.config import Config as BotoConfig

    kwargs: dict[str, Any] = {}
    if options.get("access_key_env"):  # else the standard AWS credential chain
        kwargs = {"aws_access_key_id": secret(options, "access_key"),
                  "aws_secret_access_key": secret(options, "secret_key")}
    return boto3.client(
        "s3", endpoint_url=options.get("endpoint_url"), region_name=options.get("region"),
        verify=options.get("verify_tls", True),  # false, or a CA bundle for a private CA
        config=BotoConfig(connect_timeout=options["timeout"], read_timeout=options["timeout"],
                          retries={"max_attempts": 2}), **kwargs)


# S3 error codes waiting does not change, with what the operator can do about each
S3_ACTIONS = {
    "NoSuchBucket": "create the bucket, or fix the destination's bucket name",
    "InvalidBucketName": "fix the destination's bucket name",
    "InvalidAccessKeyId": "check the access key (access_key_env / the AWS credentials)",
    "SignatureDoesNotMatch": "check the secret key (secret_key_env / the AWS credentials)",
    "AccessDenied": "give the credentials permission to write to the bucket",
}


def _error_code(exc: Exception) -> str:
    """The S3 error code of a ClientError, or of one wrapped by the managed transfer (which
    only keeps its text: "An error occurred (NoSuchBucket) when calling ...")."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    m = re.search(r"An error occurred \((\w+)\)", str(exc))
    return m.group(1) if m else ""


def _s3_error(exc: Exception, what: str) -> DeliveryError:
    text = f"S3 {what}: {type(exc).__name__}: {str(exc)[:300]}"
    action = S3_ACTIONS.get(_error_code(exc))
    return PermanentFailure(text, action) if action else DeliveryError(text)


class S3Destination(Destination):
    def __init__(self, cfg, router_ae: str = "") -> None:  # type: ignore[no-untyped-def]
        super().__init__(cfg)
        self.options = cfg.options
        self.mode = self.options["mode"]
        self.whole_study = self.mode == "zip"
        self.key = self.options["key"] or (DEFAULT_ZIP_KEY if self.whole_study
                                           else DEFAULT_INSTANCE_KEY)
        self.bucket = self.options["bucket"]
        self.spool_tmp: Path | None = None  # set by the router: zips are built on its disk

    def describe(self) -> str:
        where = self.options.get("endpoint_url") or "AWS"
        return f"s3 {self.bucket} at {where}, {self.mode}, key {self.key}"

    def key_for(self, inst: Instance, data: BinaryIO) -> str:
        lookup = dict(inst.tags)
        missing = [k for k in _keywords(self.key) if k not in lookup]
        if missing:
            ds = read_header(data)
            data.seek(0)
            lookup.update({k: text(ds.get(k)) for k in missing})
        return render_template(self.key, lookup).as_posix()

    def open(self, instances: Sequence[Instance], routes: Sequence[str] = ()) -> Session:
        try:
            client = _client(self.options)
        except DeliveryError:
            raise
        except Exception as exc:
            raise _s3_error(exc, "client") from None
        if self.whole_study:
            return _ZipSession(self, client, routes)
        return _InstanceSession(self, client)


def _keywords(template: str) -> list[str]:
    import re

    return re.findall(r"{([^{}]*)}", template)


class _InstanceSession(Session):
    def __init__(self, dest: S3Destination, client: Any) -> None:
        self.dest = dest
        self.client = client

    def send(self, inst: Instance, data: BinaryIO) -> bool:
        key = self.dest.key_for(inst, data)
        digest = hashlib.sha256()  # metadata goes first: this mode reads the file twice
        while chunk := data.read(1 << 20):
            digest.update(chunk)
        data.seek(0)
        try:
            self.client.upload_fileobj(data, self.dest.bucket, key, ExtraArgs={"Metadata": {
                "study-instance-uid": inst.study_uid, "sop-instance-uid": inst.sop_uid,
                "sha256": digest.hexdigest()}})
        except Exception as exc:
            raise _s3_error(exc, f"upload of s3://{self.dest.bucket}/{key}") from None
        return True


class _ZipSession(Session):
    """Builds the study's zip as instances arrive; uploads it at commit."""

    def __init__(self, dest: S3Destination, client: Any, routes: Sequence[str]) -> None:
        self.dest = dest
        self.client = client
        self.routes = routes
        self.zip = StudyZip(dest.spool_tmp)
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
        try:
            self.client.upload_file(self.zip.path, self.dest.bucket, self.key, ExtraArgs={
                "Metadata": {"study-instance-uid": self.zip.study_uid,
                             "instance-count": str(len(self.uids)), "sha256": sha256},
                "ContentType": "application/zip"})
        except Exception as exc:
            raise _s3_error(exc, f"upload of s3://{self.dest.bucket}/{self.key}") from None
        return self.uids

    def close(self) -> None:
        self.zip.discard()
