"""The one way the router builds an S3 client (the s3 destination, the shared spool)."""

from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config as BotoConfig

from .secrets import secret


def s3_client(options: dict[str, Any]) -> Any:
    kwargs: dict[str, Any] = {}
    if options.get("access_key_env"):  # else the standard AWS credential chain
        kwargs = {"aws_access_key_id": secret(options, "access_key"),
                  "aws_secret_access_key": secret(options, "secret_key")}
    return boto3.client(
        "s3", endpoint_url=options.get("endpoint_url"), region_name=options.get("region"),
        verify=options.get("verify_tls", True),  # false, or a CA bundle for a private CA
        config=BotoConfig(connect_timeout=options["timeout"], read_timeout=options["timeout"],
                          retries={"max_attempts": 2}), **kwargs)
