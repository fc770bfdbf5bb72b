"""The OpenAPI 3 description of the native API, served at /openapi.json.

Written out by hand, next to the routes it describes (server/web/native.py); a test checks
that every route is described and that real responses validate against the schemas.
"""

from __future__ import annotations

from typing import Any

from engine.limits import (
    DELAY_S_MAX,
    MAX_RECEIVE_COUNT_MAX,
    MESSAGE_BYTES_MAX,
    MESSAGE_BYTES_MIN,
    RECEIVE_WAIT_S_MAX,
    RETENTION_S_MAX,
    RETENTION_S_MIN,
    VISIBILITY_TIMEOUT_S_MAX,
)
from server.config import PARTITIONS_MAX, REPLICATION_FACTOR_MAX
from server.web.native import NATIVE_BATCH_MAX

_INT = {"type": "integer"}
_STR = {"type": "string"}
_NUM = {"type": "number"}


_PROTECTION: dict[str, Any] = {
    "encrypted": {"type": "boolean"},
    "rate_limit": {"type": "string", "nullable": True,
                   "description": 'Requests per second to this queue, "100/s" or '
                                  '"100/s:200"; at most the server\'s --rate-limit-queue '
                                  '("off" only when the server has none)'},
    "replication_factor": {"type": "integer", "nullable": True, "minimum": 1,
                           "maximum": REPLICATION_FACTOR_MAX,
                           "description": "Replicas of the queue in a cluster (null: the "
                                          "server's --replication-factor)"},
    "partitions": {"type": "integer", "minimum": 1, "maximum": PARTITIONS_MAX,
                   "description": "Partitions of the queue in a cluster, each with its own "
                                  "leader; fixed when the queue is created"},
}
_COUNTS: dict[str, Any] = {"type": "object", "additionalProperties": {"type": "integer"}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _range(low: int, high: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": low, "maximum": high}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    # OpenAPI 3.0 has no "null" type: it marks a schema nullable (a $ref goes in allOf).
    if "$ref" in schema:
        return {"allOf": [schema], "nullable": True}
    return {**schema, "nullable": True}


_ATTRIBUTES = {
    "visibility_timeout": _range(0, VISIBILITY_TIMEOUT_S_MAX),
    "delay_seconds": _range(0, DELAY_S_MAX),
    "retention_seconds": _range(RETENTION_S_MIN, RETENTION_S_MAX),
    "max_message_bytes": _range(MESSAGE_BYTES_MIN, MESSAGE_BYTES_MAX),
    "receive_wait_seconds": _range(0, RECEIVE_WAIT_S_MAX),
    "dead_letter_queue": _nullable(_STR),
    "max_receive_count": _nullable(_range(1, MAX_RECEIVE_COUNT_MAX)),
    "fifo": {"type": "boolean"},
    "content_based_dedup": {"type": "boolean"},
}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object", "required": ["error"], "additionalProperties": False,
        "properties": {"error": {
            "type": "object", "required": ["code", "message"], "additionalProperties": False,
            "properties": {"code": _STR, "message": _STR}}},
    },
    "EntryError": {
        "type": "object", "required": ["code", "message"], "additionalProperties": False,
        "properties": {"code": _STR, "message": _STR},
    },
    "QueueAttributes": {
        "type": "object", "additionalProperties": False, "properties": _ATTRIBUTES,
        "required": list(_ATTRIBUTES),
    },
    "QueueAttributeChanges": {
        "type": "object", "additionalProperties": False,
        "properties": {k: v for k, v in _ATTRIBUTES.items() if k != "fifo"},
    },
    "QueueStats": {
        "type": "object", "additionalProperties": False,
        "required": ["visible", "in_flight", "delayed", "oldest_age_s", "sent", "received",
                     "deleted", "expired", "moved_to_dead_letter", "purged"],
        "properties": {
            "visible": _INT, "in_flight": _INT, "delayed": _INT, "oldest_age_s": _NUM,
            "sent": _INT, "received": _INT, "deleted": _INT, "expired": _INT,
            "moved_to_dead_letter": _INT, "purged": _INT,
        },
    },
    "Tags": {"type": "object", "additionalProperties": _STR},
    "Queue": {
        "type": "object", "additionalProperties": False,
        "required": ["name", "url", "attributes", "stats", "tags", "encrypted", "rate_limit",
                     "replication_factor", "partitions", "created_at", "modified_at"],
        "properties": {
            "name": _STR, "url": _STR, "attributes": _ref("QueueAttributes"),
            "stats": _ref("QueueStats"), "tags": _ref("Tags"),
            "encrypted": {"type": "boolean"}, "rate_limit": _nullable(_STR),
            "replication_factor": {"type": "integer", "nullable": True},
            "partitions": _INT,
            "created_at": _NUM, "modified_at": _NUM,
        },
    },
    "QueueList": {
        "type": "object", "required": ["queues", "next"], "additionalProperties": False,
        "properties": {
            "queues": {"type": "array", "items": {
                "type": "object", "required": ["name", "url"], "additionalProperties": False,
                "properties": {"name": _STR, "url": _STR}}},
            "next": _nullable(_STR),
        },
    },
    "NewQueue": {
        "type": "object", "required": ["name"],
        "properties": {"name": _STR, "attributes": _ref("QueueAttributeChangesOnCreate"),
                       "tags": _ref("Tags"), **_PROTECTION},
    },
    "QueueAttributeChangesOnCreate": {
        "type": "object", "additionalProperties": False, "properties": _ATTRIBUTES,
    },
    "AttributeValue": {
        "type": "object", "required": ["type"],
        "properties": {"type": _STR, "value": _STR, "value_base64": _STR},
    },
    "OutgoingMessage": {
        "type": "object",
        "properties": {
            "body": _STR, "body_base64": _STR, "delay_seconds": _range(0, DELAY_S_MAX),
            "attributes": {"type": "object", "additionalProperties": _ref("AttributeValue")},
            "group_id": _STR, "dedup_id": _STR,
        },
    },
    "SendResult": {
        "type": "object", "additionalProperties": False,
        "required": ["message_id", "sequence_number", "duplicate"],
        "properties": {"message_id": _STR, "sequence_number": _nullable(_STR),
                       "duplicate": {"type": "boolean"}},
    },
    "SendResults": {
        "type": "object", "required": ["results"], "additionalProperties": False,
        "properties": {"results": {"type": "array", "items": {"oneOf": [
            _ref("SendResult"),
            {"type": "object", "required": ["error"], "additionalProperties": False,
             "properties": {"error": _ref("EntryError")}},
        ]}}},
    },
    "Message": {
        "type": "object", "additionalProperties": False,
        "required": ["message_id", "body", "body_base64", "receipt", "receive_count",
                     "sent_at", "first_received_at", "attributes", "group_id",
                     "sequence_number", "dedup_id"],
        "properties": {
            "message_id": _STR, "body": _nullable(_STR), "body_base64": _STR,
            "receipt": _STR, "receive_count": _INT, "sent_at": _NUM,
            "first_received_at": _NUM,
            "attributes": {"type": "object", "additionalProperties": _ref("AttributeValue")},
            "group_id": _nullable(_STR), "sequence_number": _nullable(_STR),
            "dedup_id": _nullable(_STR),
        },
    },
    "Messages": {
        "type": "object", "required": ["messages"], "additionalProperties": False,
        "properties": {"messages": {"type": "array", "items": _ref("Message")}},
    },
    "EntryResults": {
        "type": "object", "required": ["results"], "additionalProperties": False,
        "properties": {"results": {"type": "array",
                                   "items": _nullable(_ref("EntryError"))}},
    },
    "Permission": {
        "type": "object", "required": ["accounts", "actions"],
        "properties": {"accounts": {"type": "array", "minItems": 1, "items": _STR},
                       "actions": {"type": "array", "minItems": 1, "items": _STR}},
    },
    "Permissions": {
        "type": "object", "required": ["permissions"],
        "properties": {"permissions": {"type": "array", "items": {"type": "object"}}},
    },
    "Usage": {
        "type": "object", "required": ["account", "principals", "queues"],
        "properties": {"account": _STR,
                       "principals": {"type": "object", "additionalProperties": _COUNTS},
                       "queues": {"type": "object", "additionalProperties": _COUNTS}},
    },
    "Cluster": {
        "type": "object", "required": ["node", "lease_valid", "nodes", "queues", "leading"],
        "properties": {"node": _STR, "lease_valid": {"type": "boolean"},
                       "nodes": {"type": "object"}, "queues": {"type": "object"},
                       "leading": {"type": "object"},
                       # A node of workers (--workers with --cluster), to an admin: each
                       # worker's member id, whether its lease is valid and whether it
                       # answered.
                       "workers": {"type": "object"}},
    },
    "Health": {
        "type": "object", "required": ["status"], "properties": {"status": _STR},
    },
}


def _json_body(schema: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(schema)}}}


def _ok(status: str, schema: str | None, description: str) -> dict[str, Any]:
    responses: dict[str, Any] = {
        "default": {"description": "An error", "content": {
            "application/json": {"schema": _ref("Error")}}},
    }
    if schema is None:
        responses[status] = {"description": description}
    else:
        responses[status] = {"description": description, "content": {
            "application/json": {"schema": _ref(schema)}}}
    return responses


_NAME = {"name": "name", "in": "path", "required": True, "schema": _STR}
# Another account's queue, used as its policy allows; the caller's own by default.
_OWNER = {"name": "owner", "in": "query", "schema": {"type": "string",
                                                     "pattern": "^[0-9]{12}$"}}
_LABEL = {"name": "label", "in": "path", "required": True, "schema": _STR}
_BATCH = {"type": "array", "minItems": 1, "maxItems": NATIVE_BATCH_MAX}


def document() -> dict[str, Any]:
    queue_ok = _ok("200", "Queue", "The queue")
    created = _ok("201", "Queue", "Created")
    created["200"] = {"description": "It existed with these attributes", "content": {
        "application/json": {"schema": _ref("Queue")}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "Conveyor native API", "version": "1"},
        "components": {"schemas": _SCHEMAS},
        "paths": {
            "/healthz": {"get": {"operationId": "healthz",
                                 "responses": _ok("200", "Health", "Alive")}},
            "/readyz": {"get": {"operationId": "readyz",
                                "responses": _ok("200", "Health", "Ready to serve")}},
            "/v1/queues": {
                "get": {
                    "operationId": "list_queues",
                    "parameters": [
                        {"name": "prefix", "in": "query", "schema": _STR},
                        {"name": "limit", "in": "query", "schema": _range(1, 1000)},
                        {"name": "after", "in": "query", "schema": _STR},
                    ],
                    "responses": _ok("200", "QueueList", "A page of queues"),
                },
                "post": {"operationId": "create_queue", "requestBody": _json_body("NewQueue"),
                         "responses": created},
            },
            "/v1/queues/{name}": {
                "parameters": [_NAME, _OWNER],
                "get": {"operationId": "get_queue", "responses": queue_ok},
                "patch": {
                    "operationId": "update_queue",
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": {"type": "object", "properties": {
                            "attributes": _ref("QueueAttributeChanges"), **_PROTECTION}}}}},
                    "responses": queue_ok,
                },
                "delete": {"operationId": "delete_queue",
                           "responses": _ok("204", None, "Deleted")},
            },
            "/v1/queues/{name}/purge": {
                "parameters": [_NAME, _OWNER],
                "post": {"operationId": "purge_queue", "responses": _ok("204", None, "Purged")},
            },
            "/v1/queues/{name}/messages": {
                "parameters": [_NAME, _OWNER],
                "post": {
                    "operationId": "send_message",
                    "parameters": [
                        {"name": "delay_seconds", "in": "query",
                         "schema": _range(0, DELAY_S_MAX)},
                        {"name": "group_id", "in": "query", "schema": _STR},
                        {"name": "dedup_id", "in": "query", "schema": _STR},
                        {"name": "Idempotency-Key", "in": "header", "schema": _STR},
                    ],
                    "requestBody": {"required": True, "content": {
                        "application/octet-stream": {
                            "schema": {"type": "string", "format": "binary"}}}},
                    "responses": {**_ok("201", "SendResult", "Sent"), "200": {
                        "description": "A retry within 5 minutes: the original message id",
                        "content": {"application/json": {"schema": _ref("SendResult")}}}},
                },
            },
            "/v1/queues/{name}/messages/batch": {
                "parameters": [_NAME, _OWNER],
                "post": {
                    "operationId": "send_messages",
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": {"type": "object", "required": ["messages"], "properties": {
                            "messages": {**_BATCH, "items": _ref("OutgoingMessage")}}}}}},
                    "responses": _ok("200", "SendResults", "Per-message results"),
                },
            },
            "/v1/queues/{name}/messages/receive": {
                "parameters": [_NAME, _OWNER],
                "post": {
                    "operationId": "receive_messages",
                    "requestBody": {"content": {"application/json": {"schema": {
                        "type": "object", "properties": {
                            "max_messages": _range(1, NATIVE_BATCH_MAX),
                            "wait_seconds": _range(0, RECEIVE_WAIT_S_MAX),
                            "visibility_timeout": _range(0, VISIBILITY_TIMEOUT_S_MAX)}}}}},
                    "responses": _ok("200", "Messages", "Leased messages"),
                },
            },
            "/v1/queues/{name}/messages/delete": {
                "parameters": [_NAME, _OWNER],
                "post": {
                    "operationId": "delete_messages",
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": {"type": "object", "required": ["receipts"], "properties": {
                            "receipts": {**_BATCH, "items": _STR}}}}}},
                    "responses": _ok("200", "EntryResults", "Per-receipt results"),
                },
            },
            "/v1/queues/{name}/messages/visibility": {
                "parameters": [_NAME, _OWNER],
                "post": {
                    "operationId": "change_visibility",
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": {"type": "object", "required": ["entries"], "properties": {
                            "entries": {**_BATCH, "items": {
                                "type": "object", "required": ["receipt",
                                                               "visibility_timeout"],
                                "properties": {
                                    "receipt": _STR,
                                    "visibility_timeout": _range(0,
                                                                 VISIBILITY_TIMEOUT_S_MAX)}}}}}}}},
                    "responses": _ok("200", "EntryResults", "Per-entry results"),
                },
            },
            "/v1/queues/{name}/messages/{receipt}": {
                "parameters": [_NAME, _OWNER, {"name": "receipt", "in": "path",
                                               "required": True, "schema": _STR}],
                "delete": {"operationId": "delete_message",
                           "responses": _ok("204", None, "Deleted")},
            },
            "/v1/queues/{name}/permissions": {
                "parameters": [_NAME, _OWNER],
                "get": {"operationId": "list_permissions",
                        "responses": _ok("200", "Permissions", "The policy's statements")},
            },
            "/v1/queues/{name}/permissions/{label}": {
                "parameters": [_NAME, _OWNER, _LABEL],
                "put": {"operationId": "put_permission", "requestBody": _json_body("Permission"),
                        "responses": _ok("204", None, "Granted")},
                "delete": {"operationId": "delete_permission",
                           "responses": _ok("204", None, "Revoked")},
            },
            "/v1/usage": {"get": {"operationId": "usage",
                                  "responses": _ok("200", "Usage", "The account's usage")}},
            "/v1/cluster": {"get": {"operationId": "cluster",
                                    "responses": _ok("200", "Cluster",
                                                     "This node's view of its cluster "
                                                     "(404 on a single node): all of it "
                                                     "for an admin; for anyone else its "
                                                     "account's queues, nodes by alias")}},
        },
    }
