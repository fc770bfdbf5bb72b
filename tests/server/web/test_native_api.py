"""The native REST/JSON API (/v1), through aiohttp's test client against create_app."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.config import (
    DEFAULT_ACCOUNT,
    REQUEST_BYTES_MAX,
    TAG_KEY_CHARS_MAX,
    TAG_VALUE_CHARS_MAX,
    TAGS_MAX,
    ServerConfig,
)
from server.web import openapi
from server.web.app import create_app
from server.web.native import NATIVE_BATCH_MAX

Client = TestClient[Any, Any]



@pytest.fixture
async def client(aiohttp_client: Any, tmp_path: Path) -> Client:
    app = create_app(ServerConfig(data_dir=str(tmp_path / "data"), fsync="never",
                                  access_log=False))
    made: Client = await aiohttp_client(app)
    return made


# --- helpers ---------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def error_of(response: ClientResponse, status: int, code: str | None = None) -> str:
    """Assert the native error shape and status; return the message."""
    text = await response.text()
    assert response.status == status, text
    assert response.content_type == "application/json", text
    data = json.loads(text)
    assert set(data) == {"error"}, data
    assert set(data["error"]) == {"code", "message"}, data
    assert isinstance(data["error"]["code"], str) and isinstance(data["error"]["message"], str)
    assert data["error"]["message"], data
    if code is not None:
        assert data["error"]["code"] == code, data
    message: str = data["error"]["message"]
    return message


async def ok_json(response: ClientResponse, status: int = 200) -> Any:
    text = await response.text()
    assert response.status == status, text
    assert response.content_type == "application/json", text
    return json.loads(text)


async def create(client: Client, name: str, status: int = 201, **attributes: Any) -> Any:
    body: dict[str, Any] = {"name": name}
    if attributes:
        body["attributes"] = attributes
    return await ok_json(await client.post("/v1/queues", json=body), status)


async def send(client: Client, queue: str, body: bytes, **params: Any) -> Any:
    """Send one message: 201 when it is enqueued, 200 when it is a duplicate of one that was."""
    response = await client.post(f"/v1/queues/{queue}/messages", data=body,
                                 params={k: str(v) for k, v in params.items()})
    text = await response.text()
    data = json.loads(text)
    assert response.status == (200 if data.get("duplicate") else 201), text
    return data


async def receive(client: Client, queue: str, **options: Any) -> list[dict[str, Any]]:
    data = await ok_json(await client.post(f"/v1/queues/{queue}/messages/receive",
                                           json=options))
    assert set(data) == {"messages"}
    messages: list[dict[str, Any]] = data["messages"]
    return messages


async def stats(client: Client, queue: str) -> dict[str, Any]:
    data = await ok_json(await client.get(f"/v1/queues/{queue}"))
    result: dict[str, Any] = data["stats"]
    return result


DEFAULT_ATTRIBUTES = {
    "visibility_timeout": 30, "delay_seconds": 0, "retention_seconds": 4 * 24 * 3600,
    "max_message_bytes": 1024 * 1024, "receive_wait_seconds": 0, "dead_letter_queue": None,
    "max_receive_count": None, "fifo": False, "content_based_dedup": False,
}


# --- list ------------------------------------------------------------------------------------


async def test_list_filters_by_prefix_and_pages_with_next(client: Client) -> None:
    for name in ("a3", "a1", "b1", "a4", "a2", "ab", "A1"):
        await create(client, name)
    everything = await ok_json(await client.get("/v1/queues"))
    assert [q["name"] for q in everything["queues"]] == ["A1", "a1", "a2", "a3", "a4", "ab",
                                                         "b1"]
    assert everything["next"] is None
    for queue in everything["queues"]:
        assert queue["url"].endswith(f"/v1/queues/{queue['name']}")
        assert queue["url"].startswith("http://")

    # The prefix is literal and case-sensitive.
    only_a = await ok_json(await client.get("/v1/queues", params={"prefix": "a"}))
    assert [q["name"] for q in only_a["queues"]] == ["a1", "a2", "a3", "a4", "ab"]

    pages, after = [], ""
    for _ in range(10):
        params = {"prefix": "a", "limit": "2"} | ({"after": after} if after else {})
        page = await ok_json(await client.get("/v1/queues", params=params))
        pages.append([q["name"] for q in page["queues"]])
        if page["next"] is None:
            break
        assert page["next"] == pages[-1][-1]
        after = page["next"]
    assert pages == [["a1", "a2"], ["a3", "a4"], ["ab"]]

    # A last page that is exactly full says so, instead of pointing at an empty page.
    exact = await ok_json(await client.get("/v1/queues",
                                           params={"prefix": "a", "limit": "5"}))
    assert len(exact["queues"]) == 5 and exact["next"] is None
    none = await ok_json(await client.get("/v1/queues", params={"prefix": "zzz"}))
    assert none == {"queues": [], "next": None}


@pytest.mark.parametrize("limit", ["0", "1001", "-1", "x", "1.5"])
async def test_list_refuses_a_bad_limit(client: Client, limit: str) -> None:
    response = await client.get("/v1/queues", params={"limit": limit})
    message = await error_of(response, 400, "InvalidParameter")
    assert "limit" in message


@pytest.mark.parametrize("limit", ["\u00b2", "\u0663"])
async def test_list_refuses_non_ascii_digit_limits_without_a_server_error(
        client: Client, limit: str) -> None:
    # str.isdigit() accepts these, int() does not (or reads them as Arabic-Indic digits).
    response = await client.get("/v1/queues", params={"limit": limit})
    assert response.status < 500, await response.text()
    if response.status != 200:
        await error_of(response, 400, "InvalidParameter")


# --- create ----------------------------------------------------------------------------------


async def test_create_is_201_then_200_when_identical_then_409_when_different(
        client: Client) -> None:
    before = time.time()
    first = await create(client, "jobs", visibility_timeout=45)
    assert first["name"] == "jobs"
    assert first["url"].endswith("/v1/queues/jobs")
    assert first["attributes"] == DEFAULT_ATTRIBUTES | {"visibility_timeout": 45}
    assert first["tags"] == {}
    assert before - 1 <= first["created_at"] <= time.time() + 1

    again = await create(client, "jobs", 200, visibility_timeout=45)
    assert again["created_at"] == first["created_at"]
    assert again["attributes"] == first["attributes"]

    message = await error_of(
        await client.post("/v1/queues",
                          json={"name": "jobs", "attributes": {"visibility_timeout": 46}}),
        409, "QueueExists")
    assert "visibility_timeout" in message
    # The refused create changed nothing.
    assert (await ok_json(await client.get("/v1/queues/jobs")))["attributes"][
        "visibility_timeout"] == 45


@pytest.mark.parametrize(("body", "code"), [
    ({}, "MissingParameter"),
    ({"name": ""}, "MissingParameter"),
    ({"name": 7}, "MissingParameter"),
    ({"name": "has space"}, "InvalidQueueName"),
    ({"name": "semi;colon"}, "InvalidQueueName"),
    ({"name": "a" * 81}, "InvalidQueueName"),
    ({"name": "slash/name"}, "InvalidQueueName"),
    ({"name": "plain.fifo"}, "InvalidQueueName"),
    ({"name": "nofifo", "attributes": {"fifo": True}}, "InvalidQueueName"),
    ({"name": ".fifo", "attributes": {"fifo": True}}, "InvalidQueueName"),
])
async def test_create_refuses_bad_names(client: Client, body: dict[str, Any], code: str) -> None:
    await error_of(await client.post("/v1/queues", json=body), 400, code)
    listed = await ok_json(await client.get("/v1/queues"))
    assert listed["queues"] == []


async def test_create_accepts_the_longest_name(client: Client) -> None:
    await create(client, "a" * 80)
    await create(client, "b" * 75 + ".fifo", fifo=True)


@pytest.mark.parametrize("attributes", [
    {"visibility_timeout": -1},
    {"visibility_timeout": 12 * 3600 + 1},
    {"visibility_timeout": "30"},
    {"visibility_timeout": True},
    {"visibility_timeout": 1.5},
    {"delay_seconds": 901},
    {"retention_seconds": 59},
    {"max_message_bytes": 1023},
    {"receive_wait_seconds": 21},
    {"content_based_dedup": True},
    {"fifo": "yes"},
    {"dead_letter_queue": "missing", "max_receive_count": 3},
    {"max_receive_count": 3},
])
async def test_create_refuses_bad_attribute_values(client: Client,
                                                   attributes: dict[str, Any]) -> None:
    response = await client.post("/v1/queues", json={"name": "q", "attributes": attributes})
    message = await error_of(response, 400, "InvalidAttribute")
    assert any(name in message for name in attributes)
    await error_of(await client.get("/v1/queues/q"), 404, "QueueNotFound")


@pytest.mark.parametrize("name", ["VisibilityTimeout", "visibility", "colour"])
async def test_create_refuses_unknown_attribute_names(client: Client, name: str) -> None:
    response = await client.post("/v1/queues", json={"name": "q", "attributes": {name: 1}})
    message = await error_of(response, 400)
    assert name in message
    await error_of(await client.get("/v1/queues/q"), 404, "QueueNotFound")


@pytest.mark.parametrize(("data", "code"), [
    (b"{not json", "MalformedRequest"),
    (b"[1, 2]", "MalformedRequest"),
    (b'"jobs"', "MalformedRequest"),
    (b'{"name": "q", "attributes": [1]}', "InvalidParameter"),
    (b'{"name": "q", "tags": {"k": 1}}', "InvalidParameter"),
    (b'{"name": "q", "tags": "k=v"}', "InvalidParameter"),
])
async def test_create_refuses_malformed_bodies(client: Client, data: bytes, code: str) -> None:
    response = await client.post("/v1/queues", data=data,
                                 headers={"Content-Type": "application/json"})
    await error_of(response, 400, code)


@pytest.mark.parametrize("tags", [
    {"k" * (TAG_KEY_CHARS_MAX + 1): "v"},
    {"": "v"},
    {"k": "v" * (TAG_VALUE_CHARS_MAX + 1)},
    {f"k{i}": "v" for i in range(TAGS_MAX + 1)},
], ids=["long-key", "empty-key", "long-value", "too-many"])
async def test_create_refuses_tags_over_the_server_limits(client: Client,
                                                         tags: dict[str, str]) -> None:
    # The tag limits of server/config.py (docs/API.md: 50 per queue, keys 1..128, values
    # 0..256 characters) hold for every way of creating a queue.
    response = await client.post("/v1/queues", json={"name": "tagged", "tags": tags})
    await error_of(response, 400, "InvalidParameter")
    await error_of(await client.get("/v1/queues/tagged"), 404, "QueueNotFound")


async def test_create_takes_tags_at_the_limits(client: Client) -> None:
    tags = {f"k{i}": "" for i in range(TAGS_MAX - 2)}
    tags |= {"k" * TAG_KEY_CHARS_MAX: "v", "x": "v" * TAG_VALUE_CHARS_MAX}
    created = await ok_json(await client.post("/v1/queues",
                                              json={"name": "tagged", "tags": tags}), 201)
    assert created["tags"] == tags


async def test_create_with_a_dead_letter_queue_names_it_without_the_account(
        client: Client) -> None:
    await create(client, "dlq")
    source = await create(client, "src", dead_letter_queue="dlq", max_receive_count=1)
    assert source["attributes"]["dead_letter_queue"] == "dlq"
    assert source["attributes"]["max_receive_count"] == 1
    # Idempotent create compares the same (account-qualified) dead-letter name.
    await create(client, "src", 200, dead_letter_queue="dlq", max_receive_count=1)

    await send(client, "src", b"poison")
    assert len(await receive(client, "src", visibility_timeout=0)) == 1
    assert await receive(client, "src", visibility_timeout=0) == []
    [moved] = await receive(client, "dlq")
    assert base64.b64decode(moved["body_base64"]) == b"poison"
    assert (await stats(client, "src"))["moved_to_dead_letter"] == 1


# --- get -------------------------------------------------------------------------------------


async def test_get_returns_attributes_stats_tags_and_times(client: Client) -> None:
    before = time.time()
    await ok_json(await client.post("/v1/queues", json={
        "name": "orders", "attributes": {"visibility_timeout": 60, "delay_seconds": 0},
        "tags": {"team": "payments", "env": ""}}), 201)
    for body in (b"1", b"2", b"3"):
        await send(client, "orders", body)
    [leased] = await receive(client, "orders")
    await ok_json(await client.post("/v1/queues/orders/messages/delete",
                                    json={"receipts": [leased["receipt"]]}))
    await receive(client, "orders")

    queue = await ok_json(await client.get("/v1/queues/orders"))
    assert set(queue) == {"name", "url", "attributes", "stats", "tags", "encrypted",
                          "rate_limit", "replication_factor", "partitions", "created_at",
                          "modified_at"}
    assert queue["name"] == "orders"
    assert queue["url"] == f"http://{client.host}:{client.port}/v1/queues/orders"
    assert queue["attributes"] == DEFAULT_ATTRIBUTES | {"visibility_timeout": 60}
    assert queue["tags"] == {"team": "payments", "env": ""}
    assert before - 1 <= queue["created_at"] <= queue["modified_at"] <= time.time() + 1
    assert {k: queue["stats"][k] for k in ("visible", "in_flight", "delayed", "sent",
                                          "received", "deleted", "purged")} == {
        "visible": 1, "in_flight": 1, "delayed": 0, "sent": 3, "received": 2, "deleted": 1,
        "purged": 0}
    assert queue["stats"]["oldest_age_s"] >= 0


async def test_get_of_an_unknown_queue_is_404(client: Client) -> None:
    message = await error_of(await client.get("/v1/queues/nothing"), 404, "QueueNotFound")
    assert "nothing" in message


# --- update ----------------------------------------------------------------------------------


async def test_patch_changes_attributes_and_they_take_effect(client: Client) -> None:
    created = await create(client, "p")
    updated = await ok_json(await client.patch("/v1/queues/p", json={
        "attributes": {"visibility_timeout": 0, "delay_seconds": 1}}))
    assert updated["attributes"] == DEFAULT_ATTRIBUTES | {"visibility_timeout": 0,
                                                          "delay_seconds": 1}
    assert updated["modified_at"] >= created["modified_at"]
    assert (await ok_json(await client.get("/v1/queues/p")))["attributes"] == \
        updated["attributes"]

    # The queue's delay now holds new messages back ...
    await send(client, "p", b"late")
    assert await receive(client, "p") == []
    assert (await stats(client, "p"))["delayed"] == 1
    await ok_json(await client.patch("/v1/queues/p", json={"attributes": {"delay_seconds": 0}}))
    await send(client, "p", b"now")
    # ... and a visibility timeout of 0 makes a received message visible again at once.
    [first] = await receive(client, "p")
    [second] = await receive(client, "p")
    assert first["message_id"] == second["message_id"]
    assert second["receive_count"] == 2


async def test_patch_cannot_change_fifo(client: Client) -> None:
    await create(client, "std")
    await create(client, "ord.fifo", fifo=True)
    await error_of(await client.patch("/v1/queues/std", json={"attributes": {"fifo": True}}),
                   400, "InvalidAttribute")
    await error_of(await client.patch("/v1/queues/ord.fifo",
                                      json={"attributes": {"fifo": False}}),
                   400, "InvalidAttribute")
    assert (await ok_json(await client.get("/v1/queues/std")))["attributes"]["fifo"] is False
    assert (await ok_json(await client.get("/v1/queues/ord.fifo")))["attributes"]["fifo"] is True


async def test_patch_refuses_bad_values_and_changes_nothing(client: Client) -> None:
    await create(client, "p", visibility_timeout=40)
    await error_of(await client.patch("/v1/queues/p", json={
        "attributes": {"visibility_timeout": 10, "delay_seconds": -1}}), 400, "InvalidAttribute")
    message = await error_of(await client.patch("/v1/queues/p", json={
        "attributes": {"visibility_timeout": 10, "VisibilityTimeout": 10}}), 400)
    assert "VisibilityTimeout" in message
    await error_of(await client.patch("/v1/queues/p", json={"attributes": "x"}), 400,
                   "InvalidParameter")
    await error_of(await client.patch("/v1/queues/p", data=b"{",
                                      headers={"Content-Type": "application/json"}),
                   400, "MalformedRequest")
    assert (await ok_json(await client.get("/v1/queues/p")))["attributes"][
        "visibility_timeout"] == 40


async def test_patch_of_an_unknown_queue_is_404(client: Client) -> None:
    await error_of(await client.patch("/v1/queues/none", json={
        "attributes": {"visibility_timeout": 1}}), 404, "QueueNotFound")


# --- delete ----------------------------------------------------------------------------------


async def test_delete_is_204_then_404_and_a_new_queue_starts_empty(client: Client) -> None:
    await create(client, "gone")
    await send(client, "gone", b"old message")
    response = await client.delete("/v1/queues/gone")
    assert response.status == 204
    assert await response.read() == b""
    await error_of(await client.get("/v1/queues/gone"), 404, "QueueNotFound")
    await error_of(await client.delete("/v1/queues/gone"), 404, "QueueNotFound")
    await error_of(await client.post("/v1/queues/gone/messages", data=b"x"), 404,
                   "QueueNotFound")
    assert (await ok_json(await client.get("/v1/queues")))["queues"] == []

    await create(client, "gone")
    assert await receive(client, "gone", max_messages=10) == []
    assert (await stats(client, "gone"))["sent"] == 0


# --- purge -----------------------------------------------------------------------------------


async def test_purge_empties_the_queue_and_a_second_within_60_s_is_403(client: Client) -> None:
    await create(client, "full")
    for i in range(3):
        await send(client, "full", b"%d" % i)
    response = await client.post("/v1/queues/full/purge")
    assert response.status == 204
    assert await response.read() == b""
    after = await stats(client, "full")
    assert (after["visible"], after["purged"]) == (0, 3)
    assert await receive(client, "full") == []

    await send(client, "full", b"kept")
    message = await error_of(await client.post("/v1/queues/full/purge"), 403,
                             "PurgeInProgress")
    assert "full" in message
    assert (await stats(client, "full"))["visible"] == 1

    # The limit is per queue.
    await create(client, "other")
    assert (await client.post("/v1/queues/other/purge")).status == 204
    await error_of(await client.post("/v1/queues/nothing/purge"), 404, "QueueNotFound")


# --- send ------------------------------------------------------------------------------------


INVALID_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"abc\x80", b"\xf8\x88\x80\x80\x80"]


async def test_send_is_binary_safe(client: Client) -> None:
    await create(client, "bin")
    bodies = [bytes(range(256)), bytes(range(255, -1, -1)), *INVALID_UTF8,
              "héllo ✓ \x00 tab\t".encode(), b"", b'{"looks": "like json"}']
    ids = {}
    for body in bodies:
        sent = await send(client, "bin", body)
        assert set(sent) == {"message_id", "sequence_number", "duplicate"}
        assert sent["sequence_number"] is None and sent["duplicate"] is False
        ids[sent["message_id"]] = body
    assert len(ids) == len(bodies)

    received = await receive(client, "bin", max_messages=NATIVE_BATCH_MAX)
    assert len(received) == len(bodies)
    for message in received:
        body = ids[message["message_id"]]
        assert base64.b64decode(message["body_base64"], validate=True) == body
        try:
            text: str | None = body.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        assert message["body"] == text, body


async def test_send_takes_the_body_whatever_the_content_type(client: Client) -> None:
    await create(client, "ct")
    for content_type in ("application/json", "text/plain; charset=latin-1",
                         "application/x-www-form-urlencoded"):
        response = await client.post("/v1/queues/ct/messages", data=b"a=\xe9&b",
                                     headers={"Content-Type": content_type})
        await ok_json(response, 201)
    received = await receive(client, "ct", max_messages=10)
    assert [base64.b64decode(m["body_base64"]) for m in received] == [b"a=\xe9&b"] * 3


async def test_send_with_delay_seconds_holds_the_message_back(client: Client) -> None:
    await create(client, "later")
    await send(client, "later", b"late", delay_seconds=1)
    assert await receive(client, "later") == []
    assert (await stats(client, "later"))["delayed"] == 1
    await asyncio.sleep(1.2)
    [message] = await receive(client, "later")
    assert message["body"] == "late"


@pytest.mark.parametrize("delay", ["901", "-1", "abc", "1.5", "99999999999999"])
async def test_send_refuses_bad_delay_seconds(client: Client, delay: str) -> None:
    await create(client, "q")
    response = await client.post("/v1/queues/q/messages", data=b"x",
                                 params={"delay_seconds": delay})
    message = await error_of(response, 400, "InvalidParameter")
    assert "delay_seconds" in message
    assert (await stats(client, "q"))["sent"] == 0


@pytest.mark.parametrize("delay", ["\u00b2", "\u0661"])
async def test_send_refuses_non_ascii_digit_delays_without_a_server_error(
        client: Client, delay: str) -> None:
    await create(client, "q")
    response = await client.post("/v1/queues/q/messages", data=b"x",
                                 params={"delay_seconds": delay})
    assert response.status < 500, await response.text()
    if response.status != 201:
        await error_of(response, 400, "InvalidParameter")


async def test_send_to_a_fifo_queue_uses_group_and_dedup_ids(client: Client) -> None:
    await create(client, "orders.fifo", fifo=True)
    first = await send(client, "orders.fifo", b"a", group_id="g1", dedup_id="d1")
    assert isinstance(first["sequence_number"], str) and first["duplicate"] is False
    repeat = await send(client, "orders.fifo", b"other body", group_id="g1", dedup_id="d1")
    assert repeat["duplicate"] is True
    assert repeat["message_id"] == first["message_id"]
    second = await send(client, "orders.fifo", b"b", group_id="g1", dedup_id="d2")
    assert int(second["sequence_number"]) > int(first["sequence_number"])

    message = await error_of(await client.post("/v1/queues/orders.fifo/messages", data=b"x",
                                               params={"dedup_id": "d3"}),
                             400, "MissingParameter")
    assert "group_id" in message
    message = await error_of(await client.post("/v1/queues/orders.fifo/messages", data=b"x",
                                               params={"group_id": "g1"}),
                             400, "MissingParameter")
    assert "dedup_id" in message
    await error_of(await client.post("/v1/queues/orders.fifo/messages", data=b"x", params={
        "group_id": "g1", "dedup_id": "d4", "delay_seconds": "1"}), 400, "InvalidParameter")
    await error_of(await client.post("/v1/queues/orders.fifo/messages", data=b"x", params={
        "group_id": "bad group", "dedup_id": "d5"}), 400, "InvalidParameter")

    received = await receive(client, "orders.fifo", max_messages=10)
    assert [(m["body"], m["group_id"], m["dedup_id"], m["sequence_number"])
            for m in received] == [("a", "g1", "d1", first["sequence_number"]),
                                   ("b", "g1", "d2", second["sequence_number"])]


async def test_content_based_dedup_needs_no_dedup_id(client: Client) -> None:
    await create(client, "cb.fifo", fifo=True, content_based_dedup=True)
    first = await send(client, "cb.fifo", b"same", group_id="g")
    again = await send(client, "cb.fifo", b"same", group_id="g")
    other = await send(client, "cb.fifo", b"different", group_id="g")
    assert (first["duplicate"], again["duplicate"], other["duplicate"]) == (False, True, False)
    assert len(await receive(client, "cb.fifo", max_messages=10)) == 2


async def test_send_over_the_queue_limit_is_message_too_large(client: Client) -> None:
    await create(client, "small", max_message_bytes=1024)
    await send(client, "small", b"x" * 1024)
    message = await error_of(await client.post("/v1/queues/small/messages", data=b"x" * 1025),
                             400, "MessageTooLarge")
    assert "1025" in message


# --- batch send ------------------------------------------------------------------------------


async def test_batch_send_mixes_good_and_bad_entries(client: Client) -> None:
    await create(client, "batch")
    binary = bytes(range(256))
    entries: list[Any] = [
        {"body": "plain text ✓"},
        {"body_base64": b64(binary)},
        {"body_base64": "!!not base64!!"},
        {"body": "typed", "attributes": {
            "s": {"type": "String", "value": "héllo"},
            "n": {"type": "Number", "value": "-1.5e3"},
            "b": {"type": "Binary", "value_base64": b64(b"\x00\xff\x80")},
            "custom": {"type": "String.json", "value": "{}"}}},
        {},
        {"body": "x", "attributes": {"n": {"type": "Number", "value": "not a number"}}},
        {"body": "x", "attributes": {"t": {"type": "Float", "value": "1"}}},
        {"body": "x", "attributes": {"b": {"type": "Binary", "value_base64": "%%%"}}},
        {"body": "x", "attributes": {"v": {"type": "String"}}},
        {"body": "x", "delay_seconds": 901},
        "not an object",
        {"body": "last good", "delay_seconds": 0},
    ]
    data = await ok_json(await client.post("/v1/queues/batch/messages/batch",
                                           json={"messages": entries}))
    assert set(data) == {"results"}
    results = data["results"]
    assert len(results) == len(entries)
    good = {0, 1, 3, 11}
    for i, result in enumerate(results):
        if i in good:
            assert set(result) == {"message_id", "sequence_number", "duplicate"}, (i, result)
        else:
            assert set(result) == {"error"}, (i, result)
            assert set(result["error"]) == {"code", "message"}
            assert result["error"]["code"] in {"InvalidParameter", "MissingParameter"}, result
    assert results[4]["error"]["code"] == "MissingParameter"

    received = await receive(client, "batch", max_messages=10)
    by_id = {m["message_id"]: m for m in received}
    assert set(by_id) == {results[i]["message_id"] for i in good}
    text = by_id[results[0]["message_id"]]
    assert text["body"] == "plain text ✓" and text["attributes"] == {}
    raw = by_id[results[1]["message_id"]]
    assert base64.b64decode(raw["body_base64"]) == binary and raw["body"] is None
    typed = by_id[results[3]["message_id"]]
    assert typed["attributes"] == {
        "s": {"type": "String", "value": "héllo"},
        "n": {"type": "Number", "value": "-1.5e3"},
        "b": {"type": "Binary", "value_base64": b64(b"\x00\xff\x80")},
        "custom": {"type": "String.json", "value": "{}"}}


@pytest.mark.parametrize("body", [
    {}, {"messages": []}, {"messages": {"body": "x"}},
    {"messages": [{"body": "x"}] * (NATIVE_BATCH_MAX + 1)},
])
async def test_batch_send_refuses_a_bad_list(client: Client, body: dict[str, Any]) -> None:
    await create(client, "q")
    response = await client.post("/v1/queues/q/messages/batch", json=body)
    message = await error_of(response, 400)
    assert "messages" in message
    assert (await stats(client, "q"))["sent"] == 0


async def test_batch_send_takes_the_largest_batch(client: Client) -> None:
    await create(client, "q")
    data = await ok_json(await client.post("/v1/queues/q/messages/batch", json={
        "messages": [{"body": str(i)} for i in range(NATIVE_BATCH_MAX)]}))
    assert all("message_id" in r for r in data["results"])
    assert (await stats(client, "q"))["visible"] == NATIVE_BATCH_MAX


async def test_batch_send_to_a_fifo_queue(client: Client) -> None:
    await create(client, "b.fifo", fifo=True)
    data = await ok_json(await client.post("/v1/queues/b.fifo/messages/batch", json={
        "messages": [{"body": "1", "group_id": "g", "dedup_id": "1"},
                     {"body": "2", "group_id": "g", "dedup_id": "1"},
                     {"body": "3", "dedup_id": "3"},
                     {"body": "4", "group_id": 5, "dedup_id": "4"}]}))
    first, repeat, no_group, bad_group = data["results"]
    assert first["duplicate"] is False and isinstance(first["sequence_number"], str)
    assert repeat["duplicate"] is True
    assert no_group["error"]["code"] == "MissingParameter"
    assert bad_group["error"]["code"] == "InvalidParameter"


async def test_batch_send_of_unencodable_text_is_a_client_error(client: Client) -> None:
    # JSON can carry a lone surrogate ("\ud800"), which has no UTF-8 encoding.
    await create(client, "q")
    raw = b'{"messages": [{"body": "\\ud800"}, {"body": "fine"}]}'
    response = await client.post("/v1/queues/q/messages/batch", data=raw,
                                 headers={"Content-Type": "application/json"})
    assert response.status < 500, await response.text()
    data = await ok_json(response)
    assert set(data["results"][0]) == {"error"}
    assert data["results"][0]["error"]["code"] in {"InvalidParameter",
                                                   "InvalidMessageContents"}
    assert "message_id" in data["results"][1]


async def test_batch_send_of_an_unencodable_attribute_is_a_client_error(
        client: Client) -> None:
    await create(client, "q")
    raw = (b'{"messages": [{"body": "x", "attributes": {"a": {"type": "String", '
           b'"value": "\\udfff"}}}, {"body": "fine"}]}')
    response = await client.post("/v1/queues/q/messages/batch", data=raw,
                                 headers={"Content-Type": "application/json"})
    assert response.status < 500, await response.text()
    data = await ok_json(response)
    assert set(data["results"][0]) == {"error"}
    assert "message_id" in data["results"][1]


async def test_batch_send_to_an_unknown_queue_is_404_even_if_every_entry_is_bad(
        client: Client) -> None:
    await error_of(await client.post("/v1/queues/none/messages/batch",
                                     json={"messages": [{"body": "x"}]}), 404, "QueueNotFound")
    await error_of(await client.post("/v1/queues/none/messages/batch",
                                     json={"messages": [{"no": "body"}]}), 404, "QueueNotFound")


# --- receive ---------------------------------------------------------------------------------


async def test_receive_honours_max_messages(client: Client) -> None:
    await create(client, "many")
    await ok_json(await client.post("/v1/queues/many/messages/batch", json={
        "messages": [{"body": str(i)} for i in range(15)]}))
    assert len(await receive(client, "many")) == 1
    assert len(await receive(client, "many", max_messages=10)) == 10
    assert len(await receive(client, "many", max_messages=NATIVE_BATCH_MAX)) == 4
    assert await receive(client, "many", max_messages=10) == []
    # An absent body receives one message at most, with the queue's settings.
    response = await client.post("/v1/queues/many/messages/receive")
    assert await ok_json(response) == {"messages": []}


@pytest.mark.parametrize("options", [
    {"max_messages": 0}, {"max_messages": NATIVE_BATCH_MAX + 1}, {"max_messages": "ten"},
    {"wait_seconds": -1}, {"wait_seconds": 21}, {"wait_seconds": True}, {"wait_seconds": 0.5},
    {"visibility_timeout": -1}, {"visibility_timeout": 12 * 3600 + 1},
])
async def test_receive_refuses_bad_options(client: Client, options: dict[str, Any]) -> None:
    await create(client, "q")
    await send(client, "q", b"x")
    message = await error_of(await client.post("/v1/queues/q/messages/receive", json=options),
                             400, "InvalidParameter")
    assert next(iter(options)) in message
    assert (await stats(client, "q"))["received"] == 0


async def test_receive_refuses_a_non_object_body(client: Client) -> None:
    await create(client, "q")
    await error_of(await client.post("/v1/queues/q/messages/receive", json=[1]), 400,
                   "MalformedRequest")


async def test_receive_of_a_non_ascii_digit_is_a_client_error(client: Client) -> None:
    await create(client, "q")
    response = await client.post("/v1/queues/q/messages/receive", json={"max_messages": "\u00b2"})
    assert response.status < 500, await response.text()
    await error_of(response, 400, "InvalidParameter")


async def test_long_poll_returns_early_when_a_message_arrives(client: Client) -> None:
    await create(client, "poll")
    started = time.monotonic()
    waiting = asyncio.ensure_future(receive(client, "poll", wait_seconds=10))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    await send(client, "poll", b"wake up")
    [message] = await asyncio.wait_for(waiting, 5)
    assert message["body"] == "wake up"
    assert time.monotonic() - started < 5


async def test_long_poll_waits_then_returns_nothing(client: Client) -> None:
    await create(client, "quiet")
    started = time.monotonic()
    assert await receive(client, "quiet", wait_seconds=1) == []
    assert 0.8 <= time.monotonic() - started < 5


async def test_queue_receive_wait_seconds_is_the_default_wait(client: Client) -> None:
    await create(client, "slow", receive_wait_seconds=1)
    started = time.monotonic()
    assert await receive(client, "slow") == []
    assert time.monotonic() - started >= 0.8
    # wait_seconds=0 overrides it, on a queue whose default wait would show plainly.
    await create(client, "patient", receive_wait_seconds=20)
    started = time.monotonic()
    assert await receive(client, "patient", wait_seconds=0) == []
    assert time.monotonic() - started < 10


async def test_visibility_timeout_on_receive_leases_for_that_long(client: Client) -> None:
    await create(client, "lease")
    await send(client, "lease", b"job")
    [first] = await receive(client, "lease", visibility_timeout=1)
    assert set(first) == {"message_id", "body", "body_base64", "receipt", "receive_count",
                          "sent_at", "first_received_at", "attributes", "group_id",
                          "sequence_number", "dedup_id"}
    assert first["receive_count"] == 1
    assert first["sent_at"] <= first["first_received_at"]
    assert (first["group_id"], first["sequence_number"], first["dedup_id"]) == (None, None, None)
    assert await receive(client, "lease") == []
    assert (await stats(client, "lease"))["in_flight"] == 1
    await asyncio.sleep(1.2)
    [second] = await receive(client, "lease", visibility_timeout=30)
    assert second["message_id"] == first["message_id"]
    assert second["receive_count"] == 2
    assert second["receipt"] != first["receipt"]
    assert second["first_received_at"] == first["first_received_at"]
    # The first lease is over: its receipt no longer deletes the message.
    results = await ok_json(await client.post("/v1/queues/lease/messages/delete",
                                              json={"receipts": [first["receipt"]]}))
    assert results["results"][0] is not None
    assert (await stats(client, "lease"))["in_flight"] == 1


# --- delete messages -------------------------------------------------------------------------


async def test_delete_batch_is_null_per_success_and_an_error_per_bad_receipt(
        client: Client) -> None:
    await create(client, "d")
    await create(client, "elsewhere")
    for body in (b"1", b"2"):
        await send(client, "d", body)
    await send(client, "elsewhere", b"3")
    one, two = await receive(client, "d", max_messages=2)
    [foreign] = await receive(client, "elsewhere")
    data = await ok_json(await client.post("/v1/queues/d/messages/delete", json={
        "receipts": [one["receipt"], "bogus", two["receipt"], foreign["receipt"]]}))
    assert set(data) == {"results"}
    ok1, bogus, ok2, other = data["results"]
    assert ok1 is None and ok2 is None
    assert bogus["code"] == "ReceiptInvalid" and set(bogus) == {"code", "message"}
    assert other["code"] == "ReceiptInvalid" and set(other) == {"code", "message"}
    after = await stats(client, "d")
    assert (after["visible"], after["in_flight"], after["deleted"]) == (0, 0, 2)
    assert (await stats(client, "elsewhere"))["in_flight"] == 1


@pytest.mark.parametrize("body", [
    {}, {"receipts": []}, {"receipts": "r"}, {"receipts": [1]},
    {"receipts": ["r"] * (NATIVE_BATCH_MAX + 1)},
])
async def test_delete_batch_refuses_a_bad_list(client: Client, body: dict[str, Any]) -> None:
    await create(client, "q")
    await error_of(await client.post("/v1/queues/q/messages/delete", json=body), 400)


async def test_delete_one_message_by_receipt(client: Client) -> None:
    await create(client, "d")
    await send(client, "d", b"x")
    [message] = await receive(client, "d")
    response = await client.delete(f"/v1/queues/d/messages/{message['receipt']}")
    assert response.status == 204
    assert await response.read() == b""
    after = await stats(client, "d")
    assert (after["visible"], after["in_flight"], after["deleted"]) == (0, 0, 1)
    await error_of(await client.delete("/v1/queues/d/messages/not-a-receipt"), 400,
                   "ReceiptInvalid")
    await error_of(await client.delete(f"/v1/queues/none/messages/{message['receipt']}"), 404,
                   "QueueNotFound")


# --- visibility ------------------------------------------------------------------------------


async def test_change_visibility_per_entry(client: Client) -> None:
    await create(client, "v")
    for body in (b"1", b"2"):
        await send(client, "v", body)
    one, two = await receive(client, "v", max_messages=2)
    data = await ok_json(await client.post("/v1/queues/v/messages/visibility", json={
        "entries": [{"receipt": one["receipt"], "visibility_timeout": 0},
                    {"receipt": "bogus", "visibility_timeout": 0},
                    {"receipt": two["receipt"], "visibility_timeout": 600}]}))
    assert set(data) == {"results"}
    assert data["results"][0] is None and data["results"][2] is None
    assert data["results"][1]["code"] == "ReceiptInvalid"
    [again] = await receive(client, "v", max_messages=10)
    assert again["message_id"] == one["message_id"]
    assert again["receive_count"] == 2

    # A deleted message is no longer in flight.
    await client.delete(f"/v1/queues/v/messages/{again['receipt']}")
    data = await ok_json(await client.post("/v1/queues/v/messages/visibility", json={
        "entries": [{"receipt": again["receipt"], "visibility_timeout": 5}]}))
    assert data["results"][0]["code"] in {"MessageNotInFlight", "ReceiptInvalid"}


@pytest.mark.parametrize("entries", [
    None, [], "x", [{"visibility_timeout": 1}], [{"receipt": 1, "visibility_timeout": 1}],
    [{"receipt": "r"}], [{"receipt": "r", "visibility_timeout": -1}],
    [{"receipt": "r", "visibility_timeout": 12 * 3600 + 1}],
    [{"receipt": "r", "visibility_timeout": 1}] * (NATIVE_BATCH_MAX + 1),
])
async def test_change_visibility_refuses_bad_entries(client: Client, entries: Any) -> None:
    await create(client, "q")
    body = {} if entries is None else {"entries": entries}
    await error_of(await client.post("/v1/queues/q/messages/visibility", json=body), 400)


# --- errors ----------------------------------------------------------------------------------


MESSAGE_ROUTES = [
    ("GET", "/v1/queues/none", None),
    ("PATCH", "/v1/queues/none", {"attributes": {}}),
    ("DELETE", "/v1/queues/none", None),
    ("POST", "/v1/queues/none/purge", None),
    ("POST", "/v1/queues/none/messages", b"x"),
    ("POST", "/v1/queues/none/messages/batch", {"messages": [{"body": "x"}]}),
    ("POST", "/v1/queues/none/messages/receive", {}),
    ("POST", "/v1/queues/none/messages/delete", {"receipts": ["r"]}),
    ("DELETE", "/v1/queues/none/messages/r", None),
    ("POST", "/v1/queues/none/messages/visibility",
     {"entries": [{"receipt": "r", "visibility_timeout": 1}]}),
]


@pytest.mark.parametrize(("method", "path", "body"), MESSAGE_ROUTES)
async def test_every_queue_route_is_404_for_an_unknown_queue(
        client: Client, method: str, path: str, body: Any) -> None:
    kwargs = {"data": body} if isinstance(body, bytes) else {"json": body}
    message = await error_of(await client.request(method, path, **kwargs), 404, "QueueNotFound")
    assert "none" in message


@pytest.mark.parametrize("path", ["/nope", "/v1", "/v1/", "/v1/queues/", "/v1/queues/q/nope",
                                  "/v1/queues/q/messages/a/b", "/v1/queues/q/purge/x"])
async def test_unknown_routes_are_404(client: Client, path: str) -> None:
    await error_of(await client.get(path), 404, "NotFound")


@pytest.mark.parametrize("path", ["/v1/unknown", "/v1/queue"])
async def test_unknown_two_segment_routes_under_v1_are_404(client: Client, path: str) -> None:
    await error_of(await client.get(path), 404, "NotFound")


@pytest.mark.parametrize(("method", "path"), [
    ("PUT", "/v1/queues/q"), ("GET", "/v1/queues/q/messages"),
    ("DELETE", "/v1/queues/q/messages"), ("GET", "/v1/queues/q/purge"),
    ("DELETE", "/v1/queues"),
])
async def test_wrong_methods_are_405_in_the_error_shape(client: Client, method: str,
                                                        path: str) -> None:
    await error_of(await client.request(method, path), 405)


async def test_a_declared_body_over_the_limit_is_413_before_it_is_sent(client: Client) -> None:
    await create(client, "q")
    assert client.server.host is not None and client.server.port is not None
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(b"POST /v1/queues/q/messages HTTP/1.1\r\nHost: test\r\n"
                     b"Content-Length: %d\r\n\r\n" % (REQUEST_BYTES_MAX + 1))
        await writer.drain()
        # No body byte is sent: the answer must not wait for one.
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 413 "), head
        length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        body = json.loads(await asyncio.wait_for(reader.readexactly(length), 5))
        assert body["error"]["code"] == "RequestTooLarge"
        assert str(REQUEST_BYTES_MAX) in body["error"]["message"]
    finally:
        writer.close()
    assert (await stats(client, "q"))["sent"] == 0


async def test_bodies_over_the_limit_are_413(client: Client) -> None:
    await create(client, "q")
    big = io.BytesIO(b"x" * (REQUEST_BYTES_MAX + 1))
    response = await client.post("/v1/queues/q/messages", data=big,
                                 headers={"Content-Length": str(REQUEST_BYTES_MAX + 1)})
    await error_of(response, 413, "RequestTooLarge")

    async def chunked() -> Any:
        # No Content-Length: the limit is found while reading.
        for _ in range(REQUEST_BYTES_MAX // (1024 * 1024) + 1):
            yield b"x" * (1024 * 1024)

    await error_of(await client.post("/v1/queues/q/messages", data=chunked()), 413,
                   "RequestTooLarge")
    await error_of(await client.post("/v1/queues/q/messages/batch", data=chunked(),
                                     headers={"Content-Type": "application/json"}),
                   413, "RequestTooLarge")
    assert (await stats(client, "q"))["sent"] == 0


async def test_error_responses_carry_a_request_id(client: Client) -> None:
    first = await client.get("/v1/queues/none")
    second = await client.get("/v1/queues/none")
    assert first.headers["X-Request-Id"] != second.headers["X-Request-Id"]


# --- health, metrics, document ---------------------------------------------------------------


async def test_healthz_and_readyz(client: Client) -> None:
    assert await ok_json(await client.get("/healthz")) == {"status": "ok"}
    assert await ok_json(await client.get("/readyz")) == {"status": "ready"}


async def test_metrics_after_traffic(client: Client) -> None:
    await create(client, "m")
    for body in (b"1", b"2", b"3"):
        await send(client, "m", body)
    await receive(client, "m")
    await client.get("/v1/queues/none")
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.content_type == "text/plain"
    text = await response.text()
    assert "conveyor_requests_total" in text
    assert "conveyor_queue_depth" in text
    assert "conveyor_fsync_seconds" in text

    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["conveyor_fsync_seconds"].type == "histogram"

    def value(family: str, sample: str, **labels: str) -> float:
        found = [s.value for s in families[family].samples
                 if s.name == sample and s.labels == labels]
        assert len(found) == 1, (family, labels, families[family].samples)
        return found[0]

    assert value("conveyor_requests", "conveyor_requests_total", protocol="native",
                 action="send_message", status="201") == 3
    assert value("conveyor_requests", "conveyor_requests_total", protocol="native",
                 action="get_queue", status="404") == 1
    queue = f"{DEFAULT_ACCOUNT}/m"
    assert value("conveyor_queue_depth", "conveyor_queue_depth", queue=queue,
                 state="visible") == 2
    assert value("conveyor_queue_depth", "conveyor_queue_depth", queue=queue,
                 state="in_flight") == 1


async def test_one_audit_line_per_request(aiohttp_client: Any, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    app = create_app(ServerConfig(data_dir=str(tmp_path / "data"), fsync="never"))
    audited: Client = await aiohttp_client(app)
    capsys.readouterr()
    await create(audited, "a")
    await send(audited, "a", b"12345")
    await audited.post("/", data=json.dumps({"QueueName": "b"}), headers={
        "Content-Type": "application/x-amz-json-1.0",
        "X-Amz-Target": "AmazonSQS.CreateQueue"})
    await audited.get("/v1/queues/missing")
    await asyncio.sleep(0)  # the lines of a turn of the loop are written at its end
    lines = [json.loads(text) for text in capsys.readouterr().out.splitlines()]
    assert [(line["protocol"], line["action"], line["queue"], line["status"])
            for line in lines] == [
        ("native", "create_queue", f"{DEFAULT_ACCOUNT}/a", 201),
        ("native", "send_message", f"{DEFAULT_ACCOUNT}/a", 201),
        ("sqs-json", "CreateQueue", f"{DEFAULT_ACCOUNT}/b", 200),
        ("native", "get_queue", f"{DEFAULT_ACCOUNT}/missing", 404),
    ]
    assert lines[1]["bytes_in"] == 5
    for line in lines:
        assert line["request_id"] and line["latency_ms"] >= 0 and line["bytes_out"] > 0


async def test_openapi_json_is_the_document(client: Client) -> None:
    served = await ok_json(await client.get("/openapi.json"))
    assert served == json.loads(json.dumps(openapi.document()))
    assert served["openapi"].startswith("3.")
