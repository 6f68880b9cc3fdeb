"""The one way the router builds an S3 client (the s3 destination, the shared spool)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .secrets import secret


def s3_client(model: Any) -> Any:
    """A client for the bucket a model names (``config.peers.S3Access`` and a ``timeout``)."""
    import boto3  # imported here: 9 MB of an idle router that has no S3 in its configuration
    from botocore.config import Config as BotoConfig

    kwargs: dict[str, Any] = {}
    if model.access_key_env:  # else the standard AWS credential chain
        kwargs = {"aws_access_key_id": secret(model, "access_key"),
                  "aws_secret_access_key": secret(model, "secret_key")}
    return boto3.client(
        "s3", endpoint_url=model.endpoint_url, region_name=model.region,
        verify=model.verify_tls,  # false, or a CA bundle for a private CA
        config=BotoConfig(connect_timeout=model.timeout, read_timeout=model.timeout,
                          retries={"max_attempts": 2}), **kwargs)


def transfer_config(model: Any) -> Any:
    """boto3's managed transfer bounded by the model's ``transfer_threads`` and ``part_size``:
    at most that many parts are read into memory at once (boto3's default keeps up to 10
    parts of 8 MB queued beside 10 threads, ~160 MB for one large zip)."""
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(multipart_threshold=model.part_size,
                            multipart_chunksize=model.part_size,
                            max_concurrency=model.transfer_threads,
                            max_io_queue=model.transfer_threads)
    config.max_in_memory_upload_chunks = model.transfer_threads  # s3transfer's own setting
    return config


def fast_store(model: Any) -> Any | None:
    """An obstore ``S3Store`` for the model's bucket (the uploads of the s3 destination and the
    shared spool): 0.3 ms of client CPU per small object where boto3 takes 1.9 ms (request
    signing and its HTTP stack, measured against the same moto server), and 6 MB of memory
    where boto3 and a client take 36 MB (docs/performance.md). None when the credentials come
    from AWS's standard chain, which boto3 resolves, or for AWS itself with no region known
    (boto3 finds the bucket's region), or obstore cannot be imported: the caller then uses
    boto3."""
    region = model.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not model.access_key_env or (region is None and not model.endpoint_url):
        return None  # boto3 finds the credentials, or the bucket's region (and follows it)
    try:
        from obstore.store import S3Store
    except ImportError:
        return None
    from datetime import timedelta

    options: dict[str, Any] = {"timeout": f"{model.timeout:g}s",
                               "connect_timeout": f"{model.timeout:g}s"}
    if model.endpoint_url and model.endpoint_url.startswith("http://"):
        options["allow_http"] = True
    if model.verify_tls is False:
        options["allow_invalid_certificates"] = True
    elif isinstance(model.verify_tls, str):  # a CA bundle: its PEM text
        with open(model.verify_tls, encoding="ascii") as f:
            options["root_certificate"] = f.read()
    config: dict[str, Any] = {"access_key_id": secret(model, "access_key"),
                              "secret_access_key": secret(model, "secret_key"),
                              "region": region or "us-east-1"}  # an S3-compatible store
    if model.endpoint_url:
        config["endpoint"] = model.endpoint_url
    return S3Store(model.bucket, config=config, client_options=options,
                   retry_config={"max_retries": 1,
                                 "retry_timeout": timedelta(seconds=model.timeout),
                                 "backoff": {"init_backoff": timedelta(milliseconds=100),
                                             "max_backoff": timedelta(seconds=1),
                                             "base": 2}})


def fast_put(store: Any, key: str, body: Any, size: int, model: Any,
             attributes: dict[str, str] | None = None) -> None:
    """Upload ``body`` (a path, or a binary file at its start) to ``key`` through obstore: one
    request up to ``part_size``, a multipart upload of ``transfer_threads`` parts in flight
    above it."""
    import obstore

    if size <= model.part_size:
        data = Path(body).read_bytes() if isinstance(body, str | Path) else body.read()
        obstore.put(store, key, data, attributes=attributes, use_multipart=False)
    else:
        obstore.put(store, key, Path(body) if isinstance(body, str) else body,
                    attributes=attributes, use_multipart=True, chunk_size=model.part_size,
                    max_concurrency=model.transfer_threads)


def never_connected(exc: BaseException) -> bool:
    """The request failed before a byte of it left: no connection could be made (boto3's
    EndpointConnectionError, obstore's connect error)."""
    text = f"{type(exc).__name__} {exc}"
    return ("EndpointConnectionError" in text or "Could not connect to the endpoint" in text
            or "kind: Connect," in text or "tcp connect error" in text)


def describe_failure(exc: BaseException) -> str:
    """One line for a failed S3 request. obstore's errors are paragraphs (the request, the
    response body, a debug dump): the S3 error code and message, or the connection failure,
    are what the operator needs."""
    raw = str(exc)
    if not type(exc).__module__.startswith("obstore") and "Debug source" not in raw and \
            "Error performing" not in raw:
        return f"{type(exc).__name__}: {raw[:300]}"
    code = re.search(r"<Code>(\w+)</Code>", raw)
    if code:
        message = re.search(r"<Message>([^<]*)</Message>", raw)
        return f"{code.group(1)}: {message.group(1) if message else raw.splitlines()[0][:200]}"
    if never_connected(exc):
        url = re.search(r"https?://[^/\s]+", raw)
        why = re.search(r'message: "([^"]+)"', raw)
        return (f"could not connect to the endpoint {url.group(0) if url else ''}"
                f"{': ' + why.group(1) if why else ''}")
    return f"{type(exc).__name__}: {raw.split('Debug source', 1)[0].strip()[:300]}"
