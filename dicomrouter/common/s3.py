"""The one way the router builds an S3 client (the s3 destination, the shared spool)."""

from __future__ import annotations

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
