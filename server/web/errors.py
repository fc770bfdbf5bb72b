"""The one table that maps every error to HTTP.

:func:`spec_for` gives, for any exception, the HTTP status, the SQS error shape (the JSON
protocol's ``__type``), the SQS query-protocol code (also sent to JSON clients in the
``x-amzn-query-error`` header, as SQS does) and the native API's code. Anything not in the
table is a server fault: 500, reported as InternalError, and logged.
"""

from __future__ import annotations

import dataclasses

from engine import errors as e
from replication.errors import (
    ClusterError,
    NotEnoughReplicasAfterAppendError,
    NotEnoughReplicasError,
)
from server.errors import (
    BatchIdsNotDistinctError,
    BatchTooLongError,
    DependencyUnavailableError,
    EmptyBatchError,
    IncompleteSignatureError,
    InvalidAddressError,
    InvalidAttributeNameError,
    InvalidBatchEntryIdError,
    InvalidClientTokenIdError,
    MalformedRequestError,
    MetricsUnauthorizedError,
    MissingAuthenticationTokenError,
    NotFoundError,
    OverLimitError,
    PurgeInProgressError,
    RequestExpiredError,
    RequestTooLargeError,
    SignatureDoesNotMatchError,
    TaskNotFoundError,
    ThrottledError,
    TooManyEntriesError,
    UnknownActionError,
    UnsignedHeaderError,
    UnsupportedOperationError,
)


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
    # A full disk stops the queue (fail-stop) as a failed disk does; its own native code
    # tells the operator why. SQS clients get the ServiceUnavailable they retry.
    # Damage found in a queue's files: that queue stays closed until an operator salvages
    # it (docs/OPERATIONS.md, "Damage and repair"); every other queue serves on. Also a
    # CorruptDataError met by a read after the queue opened.
    (e.QueueDamagedError, _S(503, "QueueDamaged", "QueueDamaged", "QueueDamaged",
                             sender_fault=False)),
    # A damaged database (catalog, queue records, keys: engine/sqlite.py) is the whole
    # server's, not one queue's; found at start it stops the server instead.
    (e.CorruptDatabaseError, _S(503, "StorageDamaged", "StorageDamaged", "StorageDamaged",
                                sender_fault=False)),
    (e.CorruptDataError, _S(503, "QueueDamaged", "QueueDamaged", "QueueDamaged",
                            sender_fault=False)),
    (e.StorageFullError, _S(503, "ServiceUnavailable", "ServiceUnavailable", "StorageFull",
                            sender_fault=False)),
    # The server's queued messages are at --memory-max: sends wait (Retry-After) for
    # consumers to catch up. SQS clients get the ServiceUnavailable they retry.
    (e.MemoryFullError, _S(503, "ServiceUnavailable", "ServiceUnavailable", "MemoryFull",
                           sender_fault=False)),
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
    (OverLimitError, _S(400, "OverLimit", "OverLimit", "OverLimit")),
    (NotFoundError, _S(404, "NotFound", "NotFound", "NotFound")),
    (MissingAuthenticationTokenError, _S(403, "MissingAuthenticationToken",
                                         "MissingAuthenticationToken",
                                         "MissingAuthenticationToken")),
    # A signature that leaves out a header it must cover: the code is the one AWS gives for
    # "'Host' must be a 'SignedHeader'", but the status is 403, not a malformed header's
    # 400: the request is well formed and fails only to prove what it asks, as a wrong
    # signature does. Before IncompleteSignatureError, of which it is a kind.
    (UnsignedHeaderError, _S(403, "IncompleteSignature", "IncompleteSignature",
                             "IncompleteSignature")),
    # Only /metrics raises it, so no SQS client sees it; 401 asks for the bearer token.
    (MetricsUnauthorizedError, _S(401, "Unauthorized", "Unauthorized", "Unauthorized")),
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
    # Fewer in-sync replicas than the partition's minimum: named, so that an operator (and
    # a client's log) sees why, and still a 503 an SDK retries.
    # The same, found after the write was made in the leader's log: it may yet take effect.
    (NotEnoughReplicasAfterAppendError, _S(503, "NotEnoughReplicasAfterAppend",
                                           "NotEnoughReplicasAfterAppend",
                                           "NotEnoughReplicasAfterAppend", sender_fault=False)),
    (NotEnoughReplicasError, _S(503, "NotEnoughReplicas", "NotEnoughReplicas",
                                "NotEnoughReplicas", sender_fault=False)),
    # The cluster: a queue between leaders, etcd unreachable.
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
