"""A small client of the native API, for the command line's everyday verbs.

Synchronous and standard-library only (urllib): a CLI call makes one or two requests.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

DEFAULT_ENDPOINT = "http://127.0.0.1:9324"
TIMEOUT_S = 30


class ClientError(Exception):
    """The server refused the request; ``code`` is its error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code


class NativeClient:
    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, token: str | None = None) -> None:
        """``token``: a bearer token (``conveyor keys token``) for a server that requires
        authentication; by default CONVEYOR_TOKEN from the environment."""
        self.endpoint = endpoint.rstrip("/")
        self.token = token if token is not None else os.environ.get("CONVEYOR_TOKEN")

    def _call(self, method: str, path: str, body: bytes | None = None,
              content_type: str = "application/json", query: dict[str, Any] | None = None,
              timeout: float = TIMEOUT_S) -> Any:
        url = self.endpoint + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items()
                                                 if v is not None})
        headers = {"Content-Type": content_type}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            try:
                error = json.loads(exc.read())["error"]
                raise ClientError(exc.code, error["code"], error["message"]) from None
            except (ValueError, KeyError, TypeError):
                raise ClientError(exc.code, "HTTP", str(exc)) from None
        return json.loads(raw) if raw else None

    def _json(self, method: str, path: str, payload: dict[str, Any],
              timeout: float = TIMEOUT_S) -> Any:
        return self._call(method, path, json.dumps(payload).encode(), timeout=timeout)

    @staticmethod
    def _quoted(name: str) -> str:
        return urllib.parse.quote(name, safe="")

    def create_queue(self, name: str, attributes: dict[str, Any]) -> Any:
        return self._json("POST", "/v1/queues", {"name": name, "attributes": attributes})

    def list_queues(self, prefix: str = "") -> list[str]:
        names: list[str] = []
        after = ""
        while True:
            page = self._call("GET", "/v1/queues", query={"prefix": prefix, "after": after})
            names += [q["name"] for q in page["queues"]]
            if page["next"] is None:
                return names
            after = page["next"]

    def get_queue(self, name: str) -> Any:
        return self._call("GET", f"/v1/queues/{self._quoted(name)}")

    def delete_queue(self, name: str) -> None:
        self._call("DELETE", f"/v1/queues/{self._quoted(name)}")

    def purge_queue(self, name: str) -> None:
        self._call("POST", f"/v1/queues/{self._quoted(name)}/purge")

    def send(self, name: str, body: bytes, delay_seconds: int | None = None,
             group_id: str | None = None, dedup_id: str | None = None) -> Any:
        return self._call("POST", f"/v1/queues/{self._quoted(name)}/messages", body,
                          "application/octet-stream",
                          {"delay_seconds": delay_seconds, "group_id": group_id,
                           "dedup_id": dedup_id})

    def receive(self, name: str, max_messages: int, wait_seconds: int,
                visibility_timeout: int | None) -> list[dict[str, Any]]:
        payload: dict[str, Any] = {"max_messages": max_messages, "wait_seconds": wait_seconds}
        if visibility_timeout is not None:
            payload["visibility_timeout"] = visibility_timeout
        result = self._json("POST", f"/v1/queues/{self._quoted(name)}/messages/receive",
                            payload, timeout=TIMEOUT_S + wait_seconds)
        messages: list[dict[str, Any]] = result["messages"]
        return messages

    def delete(self, name: str, receipts: list[str]) -> list[Any]:
        result = self._json("POST", f"/v1/queues/{self._quoted(name)}/messages/delete",
                            {"receipts": receipts})
        results: list[Any] = result["results"]
        return results
