"""The one way the router builds an S3 client (the s3 destination, the shared spool)."""

from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config as BotoConfig

from .secrets import secret


def s3_client(model: Any) -> Any:
    """A client for the bucket a model names (``config.peers.S3Access`` and a ``timeout``)."""
    kwargs: dict[str, Any] = {}
    if model.access_key_env:  # else the standard AWS credential chain
        kwargs = {"aws_access_key_id": secret(model, "access_key"),
                  "aws_secret_access_key": secret(model, "secret_key")}
    return boto3.client(
        "s3", endpoint_url=model.endpoint_url, region_name=model.region,
        verify=model.verify_tls,  # false, or a CA bundle for a private CA
        config=BotoConfig(connect_timeout=model.timeout, read_timeout=model.timeout,
                          retries={"max_attempts": 2}), **kwargs)
