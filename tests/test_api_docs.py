"""docs/api.md, the API reference written by hand, against the live /openapi.json: every
endpoint has its section and every section an endpoint; every request and answer field is
in its endpoint's tables and every field there exists, with its type, whether it is
required, its default and its unit; every error code of server/errors.py is in its table."""

import re

import orjson
import pytest
from helpers import ROOT

from server import errors

API_DOC = ROOT / "docs" / "api.md"
# Request fields that are times: in seconds (the answers' dates are in milliseconds).
TIME_FIELDS = {"from_date", "to_date", "interval", "timeout", "last_seen", "expiration_sec", "timestamp", "expiry"}


@pytest.fixture
async def served(make_client):
    client = await make_client(authenticated=False)
    response = await client.get("/openapi.json")
    assert response.status == 200
    return orjson.loads(await response.read())


def sections(text: str) -> dict[str, str]:
    """Each `## `endpoint`` section's text, by endpoint name."""
    found = {}
    for part in re.split(r"^## ", text, flags=re.M)[1:]:
        heading, _, body = part.partition("\n")
        match = re.fullmatch(r"`(\w+\.\w+)`", heading.strip())
        if match:
            found[match[1]] = body
    return found


def table(section: str, kind: str) -> dict[str, list[str]]:
    """The rows of the section's `| request field |` or `| answer field |` table: cells by field."""
    rows, inside = {}, False
    for line in section.splitlines():
        if line.startswith(f"| {kind} field |"):
            inside = True
        elif inside and line.startswith("|"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            if not set(cells[0]) <= set("-"):
                rows[cells[0].strip("`")] = cells[1:]
        elif inside:
            break
    return rows


def resolve(document: dict, schema: dict) -> dict:
    while "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def kinds(document: dict, schema: dict) -> set[str]:
    """The JSON types a field's schema allows ("object" for a referenced schema)."""
    if "$ref" in schema:
        return {"object"}
    if "type" in schema:
        return set(schema["type"]) if isinstance(schema["type"], list) else {schema["type"]}
    return set().union(*(kinds(document, member) for member in schema.get("anyOf", [])))


def nested(document: dict, schema: dict) -> tuple[dict | None, str]:
    """The object schema inside a field (itself, its array's items, its anyOf), and the path's joint."""
    for member in [schema, *schema.get("anyOf", [])]:
        if "items" in member and "$ref" in member["items"]:
            return resolve(document, member["items"]), "[]."
        if "$ref" in member:
            return resolve(document, member), "."
    return None, ""


def fields(document: dict, schema: dict, prefix: str = "") -> dict[str, tuple[dict, bool]]:
    """Every field of an object schema, nested ones as `a.b` and `a[].b`: (schema, required)."""
    schema = resolve(document, schema)
    found = {}
    for name, field in schema.get("properties", {}).items():
        path = prefix + name
        found[path] = (field, name in schema.get("required", []))
        inner, joint = nested(document, field)
        if inner is not None:
            found.update(fields(document, inner, path + joint))
    return found


def operations(document: dict) -> dict[str, dict]:
    """Each endpoint's POST operation under its unversioned path."""
    return {path.lstrip("/"): item["post"] for path, item in document["paths"].items() if "{version}" not in path}


def request_fields(document: dict, operation: dict) -> dict:
    return fields(document, operation["requestBody"]["content"]["application/json"]["schema"])


def answer_fields(document: dict, operation: dict) -> dict:
    envelope = operation["responses"]["200"]["content"]["application/json"]["schema"]
    return fields(document, envelope["properties"]["data"])


def documented():
    return sections(API_DOC.read_text())


async def test_every_endpoint_has_its_section_and_every_section_an_endpoint(served):
    assert set(documented()) == set(operations(served))


async def test_every_request_field_is_documented_with_its_type_requirement_default_and_unit(served):
    docs = documented()
    for endpoint, operation in operations(served).items():
        rows = table(docs[endpoint], "request")
        described = request_fields(served, operation)
        assert set(rows) == set(described), endpoint
        for name, (schema, required) in described.items():
            kind, default, meaning = rows[name]
            for expected in kinds(served, schema) - {"null"}:
                assert expected in kind, (endpoint, name, expected)
            assert (default == "required") == required, (endpoint, name)
            if "default" in schema:
                assert orjson.dumps(schema["default"]).decode().strip('"') in default, (endpoint, name)
            if name.rsplit(".", 1)[-1] in TIME_FIELDS:
                assert "seconds" in kind, (endpoint, name)


async def test_every_answer_field_is_documented_with_its_type_and_unit(served):
    docs = documented()
    for endpoint, operation in operations(served).items():
        rows = table(docs[endpoint], "answer")
        described = answer_fields(served, operation)
        assert set(rows) == set(described), endpoint
        for name, (schema, _) in described.items():
            kind = rows[name][0]
            allowed = kinds(served, schema)
            for expected in allowed - {"null"}:
                assert expected in kind, (endpoint, name, expected)
            assert ("null" in kind) == ("null" in allowed), (endpoint, name)
            if name.endswith("dates"):
                assert "milliseconds" in kind, (endpoint, name)


async def test_the_document_has_the_endpoints_this_page_reads(served):
    """The parser finds what it should: a field missing from both sides would pass unseen."""
    docs = documented()
    assert {"from_date", "items[].aggregation"} <= set(table(docs["workers.get_stats"], "request"))
    assert "workers[].metrics[].stats[].values" in answer_fields(served, operations(served)["workers.get_stats"])
    assert len(table(docs["workers.get_all"], "answer")) == len(
        answer_fields(served, operations(served)["workers.get_all"])
    ) > 20


def error_codes() -> set[tuple[str, str]]:
    codes = [value for name, value in vars(errors).items() if name.isupper() and isinstance(value, tuple)]
    return {(str(code), str(subcode)) for code, subcode in codes}


@pytest.mark.parametrize("page", ["docs/api.md", "README.md"])
def test_every_error_code_is_in_the_errors_table(page):
    listed = set(re.findall(r"^\| (\d{3}) \| (\d+) \|", (ROOT / page).read_text(), flags=re.M))
    assert listed == error_codes()
