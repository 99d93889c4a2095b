"""How S3 refusals read, with boto3's own Stubber standing in for the server (the
real S3 server, moto on 127.0.0.1, is in tests/integration/test_weights.py; it does not
enforce permissions, so a refusal is played here)."""

from __future__ import annotations

import boto3
import pytest
from botocore.stub import Stubber

from snapbuild.errors import StepError
from snapbuild.steps.weights import WeightsSpec
from snapbuild.steps.weight_sources import S3Source


@pytest.mark.parametrize("code, message", [
    ("AccessDenied", "s3://models/mlp/: access is denied"),
    ("NoSuchBucket", "s3://models/mlp/: the bucket does not exist"),
])
def test_s3_refusals_say_what_and_where(code, message, monkeypatch):
    client = boto3.client("s3", region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="sekrit")
    stub = Stubber(client)
    stub.add_client_error("list_objects_v2", service_error_code=code, http_status_code=403)
    monkeypatch.setattr(S3Source, "client", lambda self, spec: client)
    with stub, pytest.raises(StepError) as e:
        S3Source().resolve(WeightsSpec(kind="weights", source="s3://models/mlp/"), base_dir=None)
    assert e.value.message == message
    assert "credentials boto3 finds" in e.value.hint and "sekrit" not in str(e.value)
