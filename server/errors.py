"""Errors of the server: part of the one hierarchy rooted at :class:`engine.errors.EngineError`.

What each becomes on the wire is decided in one table, :mod:`server.web.errors`.
"""

from __future__ import annotations

from engine import errors as e


class ServerError(e.EngineError):
    """Base for errors raised by the HTTP front end."""


class UnknownActionError(ServerError):
    def __init__(self, action: str) -> None:
        # A made-up action can be megabytes long: the answer echoes only its start.
        shown = action if len(action) <= 80 else action[:80] + "..."
        super().__init__(f"unknown action {shown!r}")
        self.action = action


class MalformedRequestError(ServerError):
    """The request body or query string cannot be parsed."""


class IncompleteBodyError(MalformedRequestError):
    """The client stopped before sending the body it declared (it left, or reset)."""

    def __init__(self, declared: int | None) -> None:
        shown = f" of {declared} bytes" if declared is not None else ""
        super().__init__(f"the connection ended before the request body{shown} was whole")
        self.declared = declared


class RequestTooLargeError(ServerError):
    def __init__(self, size: int | None, limit: int) -> None:
        shown = f"of {size} bytes " if size is not None else ""
        super().__init__(f"the request body {shown}exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class InvalidAttributeNameError(ServerError):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown attribute name {name!r}")
        self.name = name


class InvalidAddressError(ServerError):
    """A queue URL that names no queue the server could hold."""

    def __init__(self, url: str) -> None:
        super().__init__(f"the address {url!r} is not a valid queue URL")
        self.url = url


class TooManyEntriesError(ServerError):
    def __init__(self, count: int, limit: int) -> None:
        super().__init__(f"{count} entries; a batch holds at most {limit}")


class EmptyBatchError(ServerError):
    def __init__(self) -> None:
        super().__init__("a batch holds at least one entry")


class BatchIdsNotDistinctError(ServerError):
    def __init__(self, entry_id: str) -> None:
        super().__init__(f"two batch entries have the id {entry_id!r}")


class InvalidBatchEntryIdError(ServerError):
    def __init__(self, entry_id: str) -> None:
        super().__init__(f"batch entry id {entry_id!r} must be 1..80 of A-Z a-z 0-9 _ -")


class BatchTooLongError(ServerError):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"the batch's messages total {size} bytes; the limit is {limit}")


class PurgeInProgressError(ServerError):
    def __init__(self, queue: str, wait_s: float) -> None:
        super().__init__(f"queue {queue!r} was purged less than 60 seconds ago; "
                         f"try again in {wait_s:.0f} s")


class TaskNotFoundError(ServerError):
    def __init__(self, what: str) -> None:
        super().__init__(f"{what} does not exist")


class UnsupportedOperationError(ServerError):
    def __init__(self, what: str) -> None:
        super().__init__(f"{what} is not supported")


class OverLimitError(ServerError):
    """A change would take something past a limit SQS answers with OverLimit (a queue
    policy grown by AddPermission past its statements, principals or bytes)."""

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(f"{what}: {reason}")
        self.reason = reason


class NotFoundError(ServerError):
    """No route for this method and path."""


# --- authentication and authorization ------------------------------------------------------


class AuthenticationError(ServerError):
    """Base for a request whose caller cannot be established. Nothing has changed."""


class MissingAuthenticationTokenError(AuthenticationError):
    def __init__(self) -> None:
        super().__init__("the request carries no signature or token, and this server "
                         "requires one")


class MetricsUnauthorizedError(AuthenticationError):
    """A scrape of /metrics without the metrics token (server/protection/operator.py)."""


class IncompleteSignatureError(AuthenticationError):
    """An Authorization header or presigned query that is not a well-formed SigV4 one."""


class UnsignedHeaderError(IncompleteSignatureError):
    """A well-formed signature that leaves out a header the server acts on.

    A header outside SignedHeaders can be changed in flight and the signature still
    verifies, so a signature that does not cover the host, its own signing time, or the
    headers an SQS JSON request takes its action and protocol from proves nothing about
    what the server would do. Nothing has changed.
    """

    def __init__(self, header: str, why: str) -> None:
        super().__init__(f"the {header} header must be signed (named in SignedHeaders): {why}")
        self.header = header


class InvalidClientTokenIdError(AuthenticationError):
    def __init__(self, access_key_id: str) -> None:
        super().__init__(f"the access key id {access_key_id!r} does not exist or was revoked")
        self.access_key_id = access_key_id


class SignatureDoesNotMatchError(AuthenticationError):
    def __init__(self, reason: str = "") -> None:
        super().__init__("the request signature does not match the one computed from the "
                         "request and the secret key" + (f": {reason}" if reason else ""))


class RequestExpiredError(AuthenticationError):
    def __init__(self, reason: str) -> None:
        super().__init__(f"the request has expired: {reason}")


# --- protection of the server ---------------------------------------------------------------


class ThrottledError(ServerError):
    """Over a rate limit; ``retry_after_s`` is when a token will next be there."""

    def __init__(self, scope: str, retry_after_s: float) -> None:
        super().__init__(f"rate limit exceeded for {scope}; retry after "
                         f"{retry_after_s:.3f} s")
        self.scope = scope
        self.retry_after_s = retry_after_s


class DependencyUnavailableError(ServerError):
    """A dependency (the metadata store, the engine) is failing or saturated, and the
    request was refused at once rather than queued behind it."""

    def __init__(self, dependency: str, reason: str) -> None:
        super().__init__(f"the {dependency} is unavailable: {reason}")
        self.dependency = dependency


class LeaderUnreachableError(DependencyUnavailableError):
    """A partition's leader node refused the connection or did not take it in time: the
    call was never sent, so nothing of it happened there."""
