"""The OpenAPI document (/openapi.json) against the routes and the responses they give."""

from __future__ import annotations

import base64
import json
import re
import sys
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import requests
import schemathesis
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.definitions import OPENAPI_30

from server.config import ServerConfig
from server.web import openapi
from server.web.app import create_app
from tests.support.server import Server

Client = TestClient[Any, Any]


METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
DOCUMENT = openapi.document()


def documented_operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(method, path): operation
            for path, item in document["paths"].items()
            for method, operation in item.items() if method in METHODS}


def _template(canonical: str) -> str:
    # aiohttp may carry a regex in a placeholder ({name:.+}); OpenAPI has only the name.
    return re.sub(r"\{(\w+)(?::[^}]*)?\}", r"{\1}", canonical)


def _app(tmp_path: Path) -> Any:
    return create_app(ServerConfig(data_dir=str(tmp_path / "data"), fsync="never",
                                   access_log=False))


# --- a. the document against the routes ------------------------------------------------------


def test_every_route_is_documented_with_its_method(tmp_path: Path) -> None:
    app = _app(tmp_path)
    registered = set()
    for route in app.router.routes():
        path = _template(route.resource.canonical) if route.resource is not None else ""
        # HEAD is aiohttp's automatic twin of every GET, not an operation of its own.
        if route.method == "HEAD" or not (path.startswith("/v1/")
                                          or path in {"/healthz", "/readyz"}):
            continue
        registered.add((route.method.lower(), path))
    documented = set(documented_operations(DOCUMENT))
    assert len(registered) >= 13
    assert registered - documented == set(), "routes missing from the document"
    assert documented - registered == set(), "documented operations with no route"


def test_operation_ids_are_unique_and_path_parameters_match_the_templates() -> None:
    ids = Counter(op.get("operationId") for op in documented_operations(DOCUMENT).values())
    assert None not in ids
    assert [i for i, n in ids.items() if n > 1] == []
    for path, item in DOCUMENT["paths"].items():
        placeholders = set(re.findall(r"\{(\w+)\}", path))
        for method, operation in item.items():
            if method not in METHODS:
                continue
            declared = {p["name"] for p in item.get("parameters", []) + operation.get(
                "parameters", []) if p["in"] == "path"}
            assert declared == placeholders, (method, path)
            assert all(p.get("required") is True for p in item.get("parameters", [])
                       if p["in"] == "path"), path


def _foreign_types(node: object, path: str = "") -> list[str]:
    """Where a schema uses a "type" that OpenAPI 3.0 lacks ("null" is JSON Schema's; 3.0
    spells it nullable: true)."""
    found = []
    if isinstance(node, dict):
        kind = node.get("type")
        if isinstance(kind, str) and kind not in OPENAPI_30_TYPES:
            found.append(f"{path}: type {kind!r}")
        for key, value in node.items():
            if key != "example":
                found += _foreign_types(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _foreign_types(value, f"{path}/{i}")
    return found


OPENAPI_30_TYPES = {"array", "boolean", "integer", "number", "object", "string"}


def test_document_is_valid_openapi_3_0() -> None:
    assert DOCUMENT["openapi"].startswith("3.0.")
    validator = jsonschema.Draft4Validator(OPENAPI_30)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:100]}"
              for e in validator.iter_errors(DOCUMENT)]
    assert errors == [], "\n".join([*errors, "", "culprits:", *_foreign_types(DOCUMENT)])
    assert _foreign_types(DOCUMENT) == []


def test_document_loads_in_schemathesis() -> None:
    schema = schemathesis.openapi.from_dict(DOCUMENT)
    loaded = [result.ok() for result in schema.get_all_operations()]
    assert sorted(op.definition.raw["operationId"] for op in loaded) == sorted(
        op["operationId"] for op in documented_operations(DOCUMENT).values())


# --- b. real responses against the schemas ---------------------------------------------------


def _json_schema(node: Any) -> Any:
    """OpenAPI 3.0's schema dialect as JSON Schema: ``nullable: true`` admits null."""
    if isinstance(node, list):
        return [_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: _json_schema(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") is True:
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        else:
            out = {"anyOf": [{"type": "null"}, out]}
    return out


def _validator(schema: dict[str, Any]) -> jsonschema.Draft4Validator:
    # "#/components/..." references resolve against this root.
    return jsonschema.Draft4Validator({"allOf": [_json_schema(schema)],
                                       "components": _json_schema(DOCUMENT["components"])})


def _by_operation_id() -> dict[str, tuple[str, str, dict[str, Any]]]:
    return {op["operationId"]: (method, path, op)
            for (method, path), op in documented_operations(DOCUMENT).items()}


OPERATIONS = _by_operation_id()


class Checker:
    """Calls operations and checks each response against what the document declares."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.seen: list[tuple[str, int]] = []

    async def call(self, operation_id: str, status: int, *, path: dict[str, str] | None = None,
                   **kwargs: Any) -> Any:
        method, template, operation = OPERATIONS[operation_id]
        url = template.format(**(path or {}))
        response = await self.client.request(method.upper(), url, **kwargs)
        body = await response.read()
        assert response.status < 500, (operation_id, response.status, body)
        assert response.status == status, (operation_id, response.status, body)
        self.seen.append((operation_id, response.status))
        return self._validate(operation_id, operation, response, body)

    @staticmethod
    def _validate(operation_id: str, operation: dict[str, Any], response: ClientResponse,
                  body: bytes) -> Any:
        responses = operation["responses"]
        if 200 <= response.status < 300:
            # Success statuses are listed one by one, never left to "default".
            assert str(response.status) in responses, (operation_id, response.status)
        declared = responses.get(str(response.status), responses.get("default"))
        assert declared is not None, (operation_id, response.status)
        content = declared.get("content")
        if content is None:
            assert body == b"", (operation_id, body)
            return None
        assert response.content_type in content, (operation_id, response.content_type)
        data = json.loads(body)
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}"
                  for e in _validator(content[response.content_type]["schema"])
                  .iter_errors(data)]
        assert errors == [], (operation_id, response.status, errors, data)
        return data


async def _healthz(c: Checker) -> None:
    await c.call("healthz", 200)


async def _readyz(c: Checker) -> None:
    await c.call("readyz", 200)


async def _list_queues(c: Checker) -> None:
    for name in ("l1", "l2", "l3"):
        await c.call("create_queue", 201, json={"name": name})
    page = await c.call("list_queues", 200, params={"prefix": "l", "limit": "2"})
    assert page["next"] == "l2"
    last = await c.call("list_queues", 200, params={"prefix": "l", "after": "l2"})
    assert last["next"] is None
    await c.call("list_queues", 400, params={"limit": "0"})


async def _create_queue(c: Checker) -> None:
    await c.call("create_queue", 201, json={"name": "c", "tags": {"a": "b"}})
    await c.call("create_queue", 200, json={"name": "c"})
    await c.call("create_queue", 409, json={"name": "c", "attributes": {"delay_seconds": 5}})
    await c.call("create_queue", 400, json={"name": "bad name"})
    await c.call("create_queue", 400, data=b"{", headers={"Content-Type": "application/json"})


async def _get_queue(c: Checker) -> None:
    await c.call("create_queue", 201, json={"name": "dlq"})
    await c.call("create_queue", 201, json={"name": "g", "attributes": {
        "dead_letter_queue": "dlq", "max_receive_count": 5}})
    await c.call("send_message", 201, path={"name": "g"}, data=b"x")
    queue = await c.call("get_queue", 200, path={"name": "g"})
    assert queue["attributes"]["dead_letter_queue"] == "dlq"
    await c.call("get_queue", 404, path={"name": "none"})


async def _update_queue(c: Checker) -> None:
    await c.call("create_queue", 201, json={"name": "u"})
    await c.call("update_queue", 200, path={"name": "u"},
                 json={"attributes": {"visibility_timeout": 5}})
    await c.call("update_queue", 400, path={"name": "u"},
                 json={"attributes": {"visibility_timeout": -5}})
    await c.call("update_queue", 404, path={"name": "none"}, json={"attributes": {}})


async def _delete_queue(c: Checker) -> None:
    await c.call("create_queue", 201, json={"name": "d"})
    await c.call("delete_queue", 204, path={"name": "d"})
    await c.call("delete_queue", 404, path={"name": "d"})


async def _purge_queue(c: Checker) -> None:
    await c.call("create_queue", 201, json={"name": "p"})
    await c.call("purge_queue", 204, path={"name": "p"})
    await c.call("purge_queue", 403, path={"name": "p"})
    await c.call("purge_queue", 404, path={"name": "none"})


async def _send_message(c: Checker) -> None:
    await c.call("create_queue", 201, json={"name": "s"})
    await c.call("create_queue", 201, json={"name": "s.fifo", "attributes": {"fifo": True}})
    await c.call("send_message", 201, path={"name": "s"}, data=bytes(range(256)))
    sent = await c.call("send_message", 201, path={"name": "s.fifo"}, data=b"x",
                        params={"group_id": "g", "dedup_id": "d"})
    assert sent["sequence_number"] is not None
    await c.call("send_message", 400, path={"name": "s"}, data=b"x",
                 params={"delay_seconds": "901"})
    await c.call("send_message", 404, path={"name": "none"}, data=b"x")


async def _send_messages(c: Checker) -> None:
    await c.call("create_queue", 201, json={"name": "b"})
    await c.call("send_messages", 200, path={"name": "b"}, json={"messages": [
        {"body": "ok"}, {"body_base64": "AAE="}, {}, {"body_base64": "%%"}]})
    await c.call("send_messages", 400, path={"name": "b"}, json={"messages": []})
    await c.call("send_messages", 404, path={"name": "none"},
                 json={"messages": [{"body": "x"}]})


async def _receive_messages(c: Checker) -> None:
    await c.call("create_queue", 201, json={"name": "r"})
    await c.call("create_queue", 201, json={"name": "r.fifo", "attributes": {
        "fifo": True, "content_based_dedup": True}})
    await c.call("send_messages", 200, path={"name": "r"}, json={"messages": [
        {"body": "text", "attributes": {
            "s": {"type": "String", "value": "v"}, "n": {"type": "Number", "value": "1"},
            "b": {"type": "Binary", "value_base64": base64.b64encode(b"\xff").decode()}}},
        {"body_base64": base64.b64encode(b"\xff\xfe").decode()}]})
    await c.call("send_message", 201, path={"name": "r.fifo"}, data=b"f",
                 params={"group_id": "g"})
    got = await c.call("receive_messages", 200, path={"name": "r"}, json={"max_messages": 10})
    assert len(got["messages"]) == 2
    got = await c.call("receive_messages", 200, path={"name": "r.fifo"}, json={})
    assert got["messages"][0]["sequence_number"] is not None
    empty = await c.call("receive_messages", 200, path={"name": "r"}, json={})
    assert empty == {"messages": []}
    await c.call("receive_messages", 400, path={"name": "r"}, json={"max_messages": 0})
    await c.call("receive_messages", 404, path={"name": "none"}, json={})


async def _leased(c: Checker, queue: str) -> str:
    await c.call("create_queue", 201, json={"name": queue})
    await c.call("send_message", 201, path={"name": queue}, data=b"x")
    got = await c.call("receive_messages", 200, path={"name": queue}, json={})
    receipt: str = got["messages"][0]["receipt"]
    return receipt


async def _delete_messages(c: Checker) -> None:
    receipt = await _leased(c, "dm")
    data = await c.call("delete_messages", 200, path={"name": "dm"},
                        json={"receipts": [receipt, "bogus"]})
    assert data["results"][0] is None and data["results"][1] is not None
    await c.call("delete_messages", 400, path={"name": "dm"}, json={"receipts": []})
    await c.call("delete_messages", 404, path={"name": "none"}, json={"receipts": ["r"]})


async def _delete_message(c: Checker) -> None:
    receipt = await _leased(c, "d1")
    await c.call("delete_message", 204, path={"name": "d1", "receipt": receipt})
    await c.call("delete_message", 400, path={"name": "d1", "receipt": "bogus"})
    await c.call("delete_message", 404, path={"name": "none", "receipt": receipt})


async def _change_visibility(c: Checker) -> None:
    receipt = await _leased(c, "cv")
    data = await c.call("change_visibility", 200, path={"name": "cv"}, json={"entries": [
        {"receipt": receipt, "visibility_timeout": 10},
        {"receipt": "bogus", "visibility_timeout": 10}]})
    assert data["results"][0] is None and data["results"][1] is not None
    await c.call("change_visibility", 400, path={"name": "cv"},
                 json={"entries": [{"receipt": receipt}]})
    await c.call("change_visibility", 404, path={"name": "none"},
                 json={"entries": [{"receipt": receipt, "visibility_timeout": 1}]})


GRANT = {"accounts": ["111122223333"], "actions": ["SendMessage", "ReceiveMessage"]}


async def _list_permissions(c: Checker) -> None:
    await c.call("create_queue", 201, json={"name": "lp"})
    assert await c.call("list_permissions", 200, path={"name": "lp"}) == {"permissions": []}
    await c.call("put_permission", 204, path={"name": "lp", "label": "share"}, json=GRANT)
    data = await c.call("list_permissions", 200, path={"name": "lp"})
    assert [p["Sid"] for p in data["permissions"]] == ["share"]
    await c.call("list_permissions", 404, path={"name": "none"})
    await c.call("list_permissions", 400, path={"name": "lp"}, params={"owner": "x"})


async def _put_permission(c: Checker) -> None:
    await c.call("create_queue", 201, json={"name": "pp"})
    await c.call("put_permission", 204, path={"name": "pp", "label": "share"}, json=GRANT)
    await c.call("put_permission", 400, path={"name": "pp", "label": "share"}, json=GRANT)
    await c.call("put_permission", 400, path={"name": "pp", "label": "x"},
                 json={"accounts": ["111122223333"], "actions": ["DeleteQueue"]})
    await c.call("put_permission", 400, path={"name": "pp", "label": "y"}, json={})
    await c.call("put_permission", 404, path={"name": "none", "label": "z"}, json=GRANT)


async def _delete_permission(c: Checker) -> None:
    await c.call("create_queue", 201, json={"name": "dp"})
    await c.call("put_permission", 204, path={"name": "dp", "label": "share"}, json=GRANT)
    await c.call("delete_permission", 204, path={"name": "dp", "label": "share"})
    await c.call("delete_permission", 400, path={"name": "dp", "label": "share"})
    await c.call("delete_permission", 404, path={"name": "none", "label": "share"})


async def _usage(c: Checker) -> None:
    await c.call("create_queue", 201, json={"name": "u"})
    await c.call("send_message", 201, path={"name": "u"}, data=b"x")
    data = await c.call("usage", 200)
    assert data["queues"]["u"]["messages"] == 1, data


async def _cluster(c: Checker) -> None:
    await c.call("cluster", 404)  # a single node; tests/cluster check the 200 answer


SCENARIOS: dict[str, Callable[[Checker], Awaitable[None]]] = {
    "cluster": _cluster,
    "list_permissions": _list_permissions, "put_permission": _put_permission,
    "delete_permission": _delete_permission, "usage": _usage,
    "healthz": _healthz, "readyz": _readyz, "list_queues": _list_queues,
    "create_queue": _create_queue, "get_queue": _get_queue, "update_queue": _update_queue,
    "delete_queue": _delete_queue, "purge_queue": _purge_queue,
    "send_message": _send_message, "send_messages": _send_messages,
    "receive_messages": _receive_messages, "delete_messages": _delete_messages,
    "delete_message": _delete_message, "change_visibility": _change_visibility,
}
# Health endpoints and the caller's own usage have no client-error path.
NO_FAILING_CALL = {"healthz", "readyz", "usage"}
# Answered 200 only by a clustered node: tests/cluster/test_replication.py checks that.
NO_SUCCESS_ON_ONE_NODE = {"cluster"}


def test_every_operation_has_a_scenario() -> None:
    assert set(SCENARIOS) == set(OPERATIONS)


@pytest.mark.parametrize("operation_id", sorted(SCENARIOS))
async def test_real_responses_validate_against_the_document(
        aiohttp_client: Any, tmp_path: Path, operation_id: str) -> None:
    checker = Checker(await aiohttp_client(_app(tmp_path)))
    await SCENARIOS[operation_id](checker)
    statuses = {status for op, status in checker.seen if op == operation_id}
    if operation_id not in NO_SUCCESS_ON_ONE_NODE:
        assert any(200 <= s < 300 for s in statuses), statuses
    if operation_id not in NO_FAILING_CALL:
        assert any(400 <= s < 500 for s in statuses), statuses


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/v1/queues/q/nothing", 404), ("PUT", "/v1/queues/q", 405),
])
async def test_refusals_outside_the_operations_use_the_error_schema(
        aiohttp_client: Any, tmp_path: Path, method: str, path: str, status: int) -> None:
    client = await aiohttp_client(_app(tmp_path))
    response = await client.request(method, path)
    assert response.status == status
    assert response.content_type == "application/json"
    _validator({"$ref": "#/components/schemas/Error"}).validate(await response.json())


# --- c. schemathesis against a real server ---------------------------------------------------

# `make test` runs half the examples of `make faults` (and needs half the cases).
CASES_MIN = 500
EXAMPLES_PER_OPERATION = 45
CASES_MIN_LONG = 1000
EXAMPLES_PER_OPERATION_LONG = 90
# Queues that exist before generation starts, so that generated calls hit real queues too.
EXISTING = ("q1", "q2", "q1.fifo", "0", "a")
CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance,
          content_type_conformance]


def _post_json(url: str, body: object) -> int:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        status: int = response.status
        return status


def _make_existing(server: Server) -> None:
    for name in EXISTING:
        fifo = name.endswith(".fifo")
        try:
            _post_json(server.url + "/v1/queues",
                       {"name": name, "attributes": {"fifo": True} if fifo else {}})
        except urllib.error.HTTPError as exc:
            # 409: a generated PATCH changed its attributes; it still exists.
            assert exc.code == 409, exc.read()
        query = "?group_id=g&dedup_id=d" if fifo else ""
        _post_json(server.url + f"/v1/queues/{name}/messages{query}", "seed")


def _as_wait(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 6:
        return int(value)
    return None


def _tame(case: Any) -> Any:
    """Keep long polls short: a generated wait of up to 20 s, thousands of times, would
    outlast any budget. Waits, and queue defaults for them, become 0."""
    body = case.body
    if not isinstance(body, dict):
        return case
    wait = _as_wait(body.get("wait_seconds"))
    absent = "wait_seconds" not in body and case.operation.path.endswith("/receive")
    if absent or (wait is not None and 0 < wait <= 20):
        body["wait_seconds"] = 0
    attributes = body.get("attributes")
    if isinstance(attributes, dict) and "messages" not in body:
        wait = _as_wait(attributes.get("receive_wait_seconds"))
        if wait is not None and 0 < wait <= 20:
            attributes["receive_wait_seconds"] = 0
    return case


def _strategy(operation: Any, mode: schemathesis.GenerationMode) -> Any:
    strategies = [operation.as_strategy(generation_mode=mode)]
    if any(p.name == "name" for p in operation.path_parameters):
        strategies += [operation.as_strategy(generation_mode=mode, path_parameters={"name": n})
                       for n in EXISTING]
    return st.one_of(strategies).map(_tame)


def test_schemathesis_finds_no_server_errors_or_schema_violations(
        server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    _fuzz(server, capsys, EXAMPLES_PER_OPERATION, CASES_MIN)


@pytest.mark.faults
def test_schemathesis_at_length_finds_no_server_errors_or_schema_violations(
        server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    _fuzz(server, capsys, EXAMPLES_PER_OPERATION_LONG, CASES_MIN_LONG)


def _fuzz(server: Server, capsys: pytest.CaptureFixture[str], examples_per_operation: int,
          cases_min: int) -> None:
    _make_existing(server)
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == len(OPERATIONS)
    session = requests.Session()
    session.trust_env = False
    runs: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    failures: list[str] = []

    def run(case: Any) -> None:
        response = case.call(session=session, base_url=server.url, timeout=30)
        runs[case.operation.label] += 1
        statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=CHECKS)
        except FailureGroup as group:
            failures.append(f"{case.operation.label}: "
                            + "; ".join(f"{f.title}: {f.message}" for f in group.exceptions)
                            + f"\n    {case.as_curl_command(base_url=server.url)}")
        if case.operation.method.lower() == "delete" and "receipt" not in (
                case.path_parameters or {}):
            _make_existing(server)

    modes = [(schemathesis.GenerationMode.POSITIVE, examples_per_operation),
             (schemathesis.GenerationMode.NEGATIVE, examples_per_operation // 3)]
    for operation in operations:
        for mode, examples in modes:
            # A path parameter of type string cannot be made invalid: every path is a string.
            if mode is schemathesis.GenerationMode.NEGATIVE and not (operation.query
                                                                     or operation.body):
                continue

            @settings(max_examples=examples, deadline=None, database=None,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=_strategy(operation, mode))
            def generated(case: Any) -> None:
                run(case)

            generated()

    total = sum(runs.values())
    server_errors = sum(n for status, n in statuses.items() if status >= 500)
    with capsys.disabled():
        sys.stdout.write(f"\nschemathesis: {total} cases over {len(runs)} operations; "
                         f"statuses {dict(sorted(statuses.items()))}; "
                         f"{server_errors} server errors; {len(failures)} failures\n"
                         f"schemathesis: per operation {dict(sorted(runs.items()))}\n")
    assert failures == [], "\n".join(failures[:20])
    assert server_errors == 0
    assert total >= cases_min
