"""Errors of the server, and the one table that maps every error to HTTP.

Server errors subclass :class:`engine.errors.EngineError`: one hierarchy for the whole
project. :func:`spec_for` gives, for any exception, the HTTP status, the SQS error shape
(the JSON protocol's ``__type``), the SQS query-protocol code (also sent to JSON clients in
the ``x-amzn-query-error`` header, as SQS does) and the native API's code. Anything not in
the table is a server fault: 500, reported as InternalError, and logged.
"""

from __future__ import annotations

import dataclasses

from engine import errors as e
from replication.errors import ClusterError


class ServerError(e.EngineError):
    """Base for errors raised by the HTTP front end."""


class UnknownActionError(ServerError):
    def __init__(self, action: str) -> None:
        super().__init__(f"unknown action {action!r}")
        self.action = action


class MalformedRequestError(ServerError):
    """The request body or query string cannot be parsed."""


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


class NotFoundError(ServerError):
    """No route for this method and path."""


# --- authentication and authorization ------------------------------------------------------


class AuthenticationError(ServerError):
    """Base for a request whose caller cannot be established. Nothing has changed."""


class MissingAuthenticationTokenError(AuthenticationError):
    def __init__(self) -> None:
        super().__init__("the request carries no signature or token, and this server "
                         "requires one")


class IncompleteSignatureError(AuthenticationError):
    """An Authorization header or presigned query that is not a well-formed SigV4 one."""


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


@dataclasses.dataclass(frozen=True)
class ErrorSpec:
    status: int
    sqs_type: str
    query_code: str
    native_code: str
    sender_fault: bool = True


_S = ErrorSpec
# Most specific first: the first class an exception is an instance of wins.
_TABLE: list[tuple[type[BaseException], ErrorSpec]] = [
    (e.QueueNotFoundError, _S(400, "QueueDoesNotExist",
                              "AWS.SimpleQueueService.NonExistentQueue", "QueueNotFound")),
    (e.QueueExistsError, _S(400, "QueueNameExists", "QueueAlreadyExists", "QueueExists")),
    (e.ReceiptInvalidError, _S(400, "ReceiptHandleIsInvalid", "ReceiptHandleIsInvalid",
                               "ReceiptInvalid")),
    (e.MessageNotInflightError, _S(400, "MessageNotInflight",
                                   "AWS.SimpleQueueService.MessageNotInflight",
                                   "MessageNotInFlight")),
    (e.MessageTooLargeError, _S(400, "InvalidParameterValue", "InvalidParameterValue",
                                "MessageTooLarge")),
    (e.InvalidMessageContentsError, _S(400, "InvalidMessageContents",
                                       "InvalidMessageContents", "InvalidMessageContents")),
    (e.InvalidQueueNameError, _S(400, "InvalidParameterValue", "InvalidParameterValue",
                                 "InvalidQueueName")),
    (e.InvalidAttributeError, _S(400, "InvalidAttributeValue", "InvalidAttributeValue",
                                 "InvalidAttribute")),
    (e.MissingParameterError, _S(400, "MissingParameter", "MissingParameter",
                                 "MissingParameter")),
    (e.InvalidParameterError, _S(400, "InvalidParameterValue", "InvalidParameterValue",
                                 "InvalidParameter")),
    (e.QueueUnavailableError, _S(503, "ServiceUnavailable", "ServiceUnavailable",
                                 "Unavailable", sender_fault=False)),
    (e.BrokerClosedError, _S(503, "ServiceUnavailable", "ServiceUnavailable",
                             "Unavailable", sender_fault=False)),
    (UnknownActionError, _S(400, "InvalidAction", "InvalidAction", "UnknownAction")),
    (MalformedRequestError, _S(400, "MalformedQueryString", "MalformedQueryString",
                               "MalformedRequest")),
    (RequestTooLargeError, _S(413, "RequestEntityTooLarge", "RequestEntityTooLarge",
                              "RequestTooLarge")),
    (InvalidAttributeNameError, _S(400, "InvalidAttributeName", "InvalidAttributeName",
                                   "InvalidAttributeName")),
    (InvalidAddressError, _S(404, "InvalidAddress", "InvalidAddress", "InvalidAddress")),
    (TooManyEntriesError, _S(400, "TooManyEntriesInBatchRequest",
                             "AWS.SimpleQueueService.TooManyEntriesInBatchRequest",
                             "TooManyEntries")),
    (EmptyBatchError, _S(400, "EmptyBatchRequest",
                         "AWS.SimpleQueueService.EmptyBatchRequest", "EmptyBatch")),
    (BatchIdsNotDistinctError, _S(400, "BatchEntryIdsNotDistinct",
                                  "AWS.SimpleQueueService.BatchEntryIdsNotDistinct",
                                  "BatchEntryIdsNotDistinct")),
    (InvalidBatchEntryIdError, _S(400, "InvalidBatchEntryId",
                                  "AWS.SimpleQueueService.InvalidBatchEntryId",
                                  "InvalidBatchEntryId")),
    (BatchTooLongError, _S(400, "BatchRequestTooLong",
                           "AWS.SimpleQueueService.BatchRequestTooLong", "BatchTooLong")),
    (PurgeInProgressError, _S(403, "PurgeQueueInProgress",
                              "AWS.SimpleQueueService.PurgeQueueInProgress",
                              "PurgeInProgress")),
    (TaskNotFoundError, _S(404, "ResourceNotFoundException", "ResourceNotFoundException",
                           "NotFound")),
    (UnsupportedOperationError, _S(400, "UnsupportedOperation",
                                   "AWS.SimpleQueueService.UnsupportedOperation",
                                   "UnsupportedOperation")),
    (NotFoundError, _S(404, "NotFound", "NotFound", "NotFound")),
    (MissingAuthenticationTokenError, _S(403, "MissingAuthenticationToken",
                                         "MissingAuthenticationToken",
                                         "MissingAuthenticationToken")),
    (IncompleteSignatureError, _S(400, "IncompleteSignature", "IncompleteSignature",
                                  "IncompleteSignature")),
    (InvalidClientTokenIdError, _S(403, "InvalidClientTokenId", "InvalidClientTokenId",
                                   "InvalidClientTokenId")),
    (SignatureDoesNotMatchError, _S(403, "SignatureDoesNotMatch", "SignatureDoesNotMatch",
                                    "SignatureDoesNotMatch")),
    (RequestExpiredError, _S(400, "RequestExpired", "RequestExpired", "RequestExpired")),
    (ThrottledError, _S(429, "ThrottlingException", "RequestThrottled", "Throttled")),
    (DependencyUnavailableError, _S(503, "ServiceUnavailable", "ServiceUnavailable",
                                    "Unavailable", sender_fault=False)),
    # The cluster: a queue between leaders, too few in-sync replicas, etcd unreachable.
    (ClusterError, _S(503, "ServiceUnavailable", "ServiceUnavailable", "Unavailable",
                      sender_fault=False)),
]

INTERNAL = ErrorSpec(500, "InternalError", "InternalError", "Internal", sender_fault=False)


def spec_for(exc: BaseException) -> ErrorSpec:
    for cls, spec in _TABLE:
        if isinstance(exc, cls):
            return spec
    return INTERNAL


def native_status(exc: BaseException) -> int:
    """The native API's status: REST-style where SQS uses 400 for everything."""
    if isinstance(exc, e.QueueNotFoundError | TaskNotFoundError | NotFoundError):
        return 404
    if isinstance(exc, e.QueueExistsError):
        return 409
    return spec_for(exc).status
