"""schemathesis against the app's own OpenAPI schema, on a real uvicorn at 127.0.0.1: no 5xx, conforming answers.

The schema is taken from `create_app(...).openapi()` at import (no model needed to build it); the requests go to
a real server. `schema.parametrize()` over a lazily loaded fixture schema fails under pytest 9 (schemathesis'
plugin reads `Function._nodeid`), hence the eager schema plus a `live_url` fixture.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from server.app import create_app
from server.settings import Settings
from tests.server.conftest import LiveServer, tiny_settings

schema = schemathesis.openapi.from_dict(create_app(Settings()).openapi())

# Not run: positive_data_acceptance. Operator limits (max_new_tokens, stop strings, input tokens, top_n_tokens)
# and TGI features this server refuses (grammar, adapter_id, watermark, best_of > 1) are checked past the static
# schema, so schema-valid bodies can rightly get a 422.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
def live_url(checkpoint_dir: Path) -> Iterator[str]:
    # max_new_tokens 8: bounded work per generated example
    s = tiny_settings(checkpoint_dir, max_queue=64, max_new_tokens=8, request_timeout=30.0)
    with LiveServer(s) as server:
        yield server.url


@schema.parametrize()
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case: schemathesis.Case, live_url: str) -> None:
    case.call_and_validate(base_url=live_url, checks=CHECKS, timeout=30)
