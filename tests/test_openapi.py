"""The API description: generated from the schemas, valid OpenAPI, served without
credentials, printed by the command line, and covering every endpoint, path form and method."""

import re
import subprocess
import sys

import orjson
import pytest
from helpers import ROOT, WORKER_ENDPOINTS
from openapi_spec_validator import validate

from server import errors, openapi
from server.config import Settings
from server.keys import SETTINGS

ENDPOINTS = ["auth.login", *WORKER_ENDPOINTS]


@pytest.fixture(scope="module")
def document():
    return openapi.document(Settings())


def test_the_document_is_valid_openapi(document):
    validate(document)
    assert document["openapi"].startswith("3.1")


async def test_served_without_credentials_as_generated(make_client):
    client = await make_client(authenticated=False, token_cookie="session_token")
    response = await client.get("/openapi.json")
    assert response.status == 200
    assert response.content_type == "application/json"
    served = orjson.loads(await response.read())
    assert served == orjson.loads(orjson.dumps(openapi.document(client.server.app[SETTINGS])))
    assert served["components"]["securitySchemes"]["cookie"]["name"] == "session_token"


def test_printed_by_the_command_line(document):
    printed = subprocess.run(
        [sys.executable, "-m", "server", "openapi"], cwd=ROOT, check=True, capture_output=True, timeout=60
    ).stdout
    assert orjson.loads(printed) == orjson.loads(orjson.dumps(document))


def test_every_endpoint_under_both_path_forms_with_each_method(document):
    expected = {f"/{name}" for name in ENDPOINTS} | {f"/v{{version}}/{name}" for name in ENDPOINTS}
    assert set(document["paths"]) == expected
    for path, item in document["paths"].items():
        assert {"get", "post", "put"} <= set(item), path
        for method in ("get", "post", "put"):
            operation = item[method]
            assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("Request")
            assert {"200", "400", "401", "413", "500", "503"} <= set(operation["responses"]), path
            assert {"bearer": []} in operation["security"] and {"basic": []} in operation["security"]
        if path.startswith("/v{version}"):
            assert item["parameters"][0]["name"] == "version"


def test_request_bodies_are_the_validating_schemas(document):
    schemas = document["components"]["schemas"]
    report = schemas["StatusReportRequest"]
    assert set(report["required"]) == {"worker", "timestamp"}
    assert report["properties"]["worker"]["maxLength"] == 512
    assert report["properties"]["tags"]["type"] == ["array", "null"]  # null means absent (SPEC §1)
    stats = schemas["StatsRequest"]
    assert set(stats["required"]) == {"from_date", "to_date", "interval", "items"}
    assert schemas["StatItem"]["properties"]["aggregation"]["enum"] == ["avg", "min", "max", None]


def test_answers_are_described_with_their_envelope(document):
    schemas = document["components"]["schemas"]
    assert set(schemas["Meta"]["required"]) >= {"id", "trx", "endpoint", "result_code", "result_subcode"}
    answer = document["paths"]["/workers.get_all"]["post"]["responses"]["200"]["content"]["application/json"]
    assert answer["schema"]["properties"]["data"] == {"$ref": "#/components/schemas/Workers"}
    assert schemas["Worker"]["additionalProperties"] is False
    unavailable = document["components"]["responses"]["Error503"]
    assert "Retry-After" in unavailable["headers"]
    described = " ".join(answer["description"] for answer in document["components"]["responses"].values())
    for name, value in vars(errors).items():
        if name.isupper() and isinstance(value, tuple) and value != errors.METHOD_NOT_ALLOWED:
            assert f"{value[0]}/{value[1]}" in described, name


def test_the_limits_of_the_settings_are_in_the_document():
    document = openapi.document(
        Settings(max_metric_keys_per_report=10, max_values_per_metric=20, max_stats_items=3, max_stats_worker_ids=0)
    )
    schemas = document["components"]["schemas"]
    stats = schemas["StatusReportRequest"]["properties"]["machine_stats"]
    assert stats["maxProperties"] == 10
    assert {"type": "array", "maxItems": 20}.items() <= stats["additionalProperties"]["anyOf"][1].items()
    assert schemas["StatsRequest"]["properties"]["items"]["maxItems"] == 3
    assert "maxItems" not in schemas["StatsRequest"]["properties"]["worker_ids"]  # 0: no limit


def test_the_runtime_properties_take_versions_from_2_10_on(document):
    """The version parameter of an endpoint with a least version allows exactly the versions served."""
    for endpoint in ("workers.set_runtime_properties", "workers.get_runtime_properties"):
        [parameter] = document["paths"][f"/v{{version}}/{endpoint}"]["parameters"]
        pattern = re.compile(parameter["schema"]["pattern"])
        assert "2.10" in parameter["description"]
        for version in ("2.10", "2.010", "02.11", "2.30", "2.100", "3.0", "10.0", "999.0"):
            assert pattern.match(version), (endpoint, version)
        for version in ("2.9", "2.09", "2.1", "1.99", "0.0", "1.100", "2.", "2", "v2.10"):
            assert not pattern.match(version), (endpoint, version)
    [parameter] = document["paths"]["/v{version}/workers.get_all"]["parameters"]
    assert parameter["schema"]["pattern"] == "^[0-9]+\\.[0-9]+$"
    properties = document["components"]["schemas"]["SetRuntimePropertiesRequest"]["properties"]
    assert properties["runtime_properties"]["maxItems"] == Settings().max_runtime_properties_per_call
