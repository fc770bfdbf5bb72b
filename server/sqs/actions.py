"""The SQS actions, one function each, over protocol-neutral parameters.

Each action takes the request's parameters as the JSON protocol shapes them (the query
protocol's parser produces the same shape) and returns its result the same way. The
protocol modules frame both. Validation follows SQS: what it would refuse is refused here
with the error it would give, before anything changes.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

from engine import SendEntry
from engine.errors import (
    EngineError,
    InvalidParameterError,
    MissingParameterError,
    QueueNotFoundError,
)
from engine.limits import (
    BATCH_ENTRIES_MAX,
    MESSAGE_BYTES_MAX,
    RECEIVE_MESSAGES_MAX,
    RECEIVE_WAIT_S_MAX,
    VISIBILITY_TIMEOUT_S_MAX,
    message_bytes,
)
from server.config import LIST_PAGE_MAX
from server.errors import (
    BatchIdsNotDistinctError,
    BatchTooLongError,
    EmptyBatchError,
    InvalidBatchEntryIdError,
    TooManyEntriesError,
)
from server.moves import task_source
from server.service import QueueService
from server.sqs import shapes
from server.sqs.attempts import ReceiveAttempts

if TYPE_CHECKING:
    from server.workers.siblings import Siblings
from server.web.errors import spec_for
from server.web.params import int_in_range

_ENTRY_ID = re.compile(r"[A-Za-z0-9_-]{1,80}")


@dataclasses.dataclass
class Context:
    service: QueueService
    account: str
    base_url: str
    region: str
    # FIFO ReceiveRequestAttemptId -> the answer, per queue (bounded: see attempts.py).
    attempts: ReceiveAttempts
    sender: str | None = None
    queue: tuple[str, str] | None = None
    """(account, name) from the request's QueueUrl, when the handler has parsed it: once
    per request, not again by the action."""
    siblings: Siblings | None = None
    """The server's other workers; None: this process is the server."""

    def url(self, account: str, name: str) -> str:
        return shapes.queue_url(self.base_url, account, name)

    def elsewhere(self, engine_name: str) -> Siblings | None:
        """The siblings, if the queue's per-queue state (its receive attempts and move
        tasks) is at another worker, its home (server/workers/siblings.py)."""
        siblings = self.siblings
        return None if siblings is None or siblings.is_home(engine_name) else siblings

    async def at_home(self, engine_name: str, action: str, params: Params
                      ) -> dict[str, Any] | None:
        """The action's answer, made at the queue's home if that is another worker; None
        if it is this one."""
        siblings = self.elsewhere(engine_name)
        if siblings is None:
            return None
        answer: dict[str, Any] = await siblings.at_home(
            engine_name, "sqs_action", action, self.account, self.base_url, self.region,
            self.sender, dict(params))
        return answer

    async def remembered(self, engine_name: str, attempt: str) -> dict[str, Any] | None:
        siblings = self.elsewhere(engine_name)
        if siblings is None:
            return self.attempts.get(engine_name, attempt)
        answer: dict[str, Any] | None = await siblings.at_home(engine_name, "attempt_get",
                                                               attempt)
        return answer

    async def remember(self, engine_name: str, attempt: str, answer: dict[str, Any]) -> None:
        siblings = self.elsewhere(engine_name)
        if siblings is None:
            self.attempts.put(engine_name, attempt, answer)
        else:
            await siblings.at_home(engine_name, "attempt_put", attempt, answer)


Params = Mapping[str, Any]
Action = Callable[[Context, Params], Awaitable[dict[str, Any]]]


# --- parameter helpers -------------------------------------------------------------------


def _text(params: Params, name: str) -> str:
    value = params.get(name)
    if value is None or value == "":
        raise MissingParameterError(name, f"the request needs {name}")
    if not isinstance(value, str):
        raise InvalidParameterError(name, value, "must be a string")
    return value


def _int(params: Params, name: str, low: int, high: int) -> int | None:
    return int_in_range(params.get(name), name, low, high)


def _queue(ctx: Context, params: Params) -> tuple[str, str]:
    if ctx.queue is not None:
        return ctx.queue
    return shapes.parse_queue_url(params.get("QueueUrl"))


def _entries(params: Params) -> list[Mapping[str, Any]]:
    entries = params.get("Entries")
    if entries is None:
        raise MissingParameterError("Entries", "the request needs Entries")
    if not isinstance(entries, list):
        raise InvalidParameterError("Entries", entries, "must be a list")
    if not entries:
        raise EmptyBatchError()
    if len(entries) > BATCH_ENTRIES_MAX:
        raise TooManyEntriesError(len(entries), BATCH_ENTRIES_MAX)
    seen: set[str] = set()
    for entry in entries:
        if not isinstance(entry, Mapping):
            raise InvalidParameterError("Entries", entry, "each entry must be a map")
        entry_id = entry.get("Id")
        if not isinstance(entry_id, str) or not _ENTRY_ID.fullmatch(entry_id):
            raise InvalidBatchEntryIdError(str(entry_id))
        if entry_id in seen:
            raise BatchIdsNotDistinctError(entry_id)
        seen.add(entry_id)
    return entries


def _failure(entry_id: str, exc: BaseException) -> dict[str, Any]:
    spec = spec_for(exc)
    return {"Id": entry_id, "SenderFault": spec.sender_fault, "Code": spec.query_code,
            "Message": str(exc)}


def _outcome(entries: list[Mapping[str, Any]], errors: list[EngineError | None]
             ) -> dict[str, Any]:
    """A batch answer for entries that carry nothing back but their id."""
    successful = []
    failed = []
    for entry_id, error in zip((e["Id"] for e in entries), errors, strict=True):
        if error is None:
            successful.append({"Id": entry_id})
        else:
            failed.append(_failure(entry_id, error))
    return {"Successful": successful, "Failed": failed}


def _page(params: Params) -> tuple[int | None, str]:
    limit = _int(params, "MaxResults", 1, LIST_PAGE_MAX)
    token = params.get("NextToken") or ""
    if not isinstance(token, str):
        raise InvalidParameterError("NextToken", token, "must be a string")
    return limit, token


# --- queues ------------------------------------------------------------------------------


async def create_queue(ctx: Context, params: Params) -> dict[str, Any]:
    name = _text(params, "QueueName")
    engine, extra = shapes.engine_attributes(params.get("Attributes") or {}, creating=True)
    tags = _tags(params.get("tags") or {})
    # FifoQueue decides the queue type; the name must agree (checked by the engine).
    record = await ctx.service.create_queue(ctx.account, name, engine, extra, tags)
    return {"QueueUrl": ctx.url(record.account, record.name)}


async def get_queue_url(ctx: Context, params: Params) -> dict[str, Any]:
    name = _text(params, "QueueName")
    account = params.get("QueueOwnerAWSAccountId") or ctx.account
    if not isinstance(account, str):
        raise InvalidParameterError("QueueOwnerAWSAccountId", account, "must be a string")
    record = await ctx.service.record(account, name)
    return {"QueueUrl": ctx.url(record.account, record.name)}


async def list_queues(ctx: Context, params: Params) -> dict[str, Any]:
    prefix = params.get("QueueNamePrefix") or ""
    if not isinstance(prefix, str):
        raise InvalidParameterError("QueueNamePrefix", prefix, "must be a string")
    limit, token = _page(params)
    names, after = await ctx.service.list_queues(ctx.account, prefix,
                                                 limit or LIST_PAGE_MAX, token)
    out: dict[str, Any] = {"QueueUrls": [ctx.url(ctx.account, n) for n in names]}
    if after is not None and limit is not None:
        out["NextToken"] = after  # pagination only when asked for, as SQS does
    return out


async def delete_queue(ctx: Context, params: Params) -> dict[str, Any]:
    await ctx.service.delete_queue(*_queue(ctx, params))
    return {}


async def get_queue_attributes(ctx: Context, params: Params) -> dict[str, Any]:
    account, name = _queue(ctx, params)
    wanted = shapes.check_attribute_names(params.get("AttributeNames"))
    view = await ctx.service.view(account, name)
    attributes = shapes.sqs_attributes(view.record, view.attributes, view.stats, ctx.region,
                                       wanted)
    return {"Attributes": attributes} if attributes else {}


async def set_queue_attributes(ctx: Context, params: Params) -> dict[str, Any]:
    account, name = _queue(ctx, params)
    raw = params.get("Attributes")
    if raw is None:
        raise MissingParameterError("Attributes", "the request needs Attributes")
    engine, extra = shapes.engine_attributes(raw, creating=False)
    await ctx.service.set_attributes(account, name, engine, extra)
    return {}


def _tags(raw: object) -> dict[str, str]:
    if not isinstance(raw, Mapping):
        raise InvalidParameterError("Tags", raw, "must be a map")
    return dict(raw)


async def tag_queue(ctx: Context, params: Params) -> dict[str, Any]:
    account, name = _queue(ctx, params)
    tags = params.get("Tags")
    if tags is None:
        raise MissingParameterError("Tags", "the request needs Tags")
    await ctx.service.tag(account, name, _tags(tags))
    return {}


async def untag_queue(ctx: Context, params: Params) -> dict[str, Any]:
    account, name = _queue(ctx, params)
    keys = params.get("TagKeys")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise MissingParameterError("TagKeys", "the request needs TagKeys")
    await ctx.service.untag(account, name, keys)
    return {}


async def list_queue_tags(ctx: Context, params: Params) -> dict[str, Any]:
    record = await ctx.service.record(*_queue(ctx, params))
    return {"Tags": dict(record.tags)} if record.tags else {}


async def purge_queue(ctx: Context, params: Params) -> dict[str, Any]:
    await ctx.service.purge(*_queue(ctx, params))
    return {}


async def list_dead_letter_source_queues(ctx: Context, params: Params) -> dict[str, Any]:
    account, name = _queue(ctx, params)
    limit, token = _page(params)
    sources = [s for s in await ctx.service.dead_letter_sources(account, name)
               if s[1] > token]
    page = sources[: limit or LIST_PAGE_MAX]
    out: dict[str, Any] = {"queueUrls": [ctx.url(a, n) for a, n in page]}
    if limit is not None and len(sources) > limit:
        out["NextToken"] = page[-1][1]
    return out


# --- messages -----------------------------------------------------------------------------


def _send_entry(ctx: Context, params: Mapping[str, Any]) -> SendEntry:
    body = shapes.body_bytes(params.get("MessageBody"))
    delay = _int(params, "DelaySeconds", -(2**31), 2**31)
    system = shapes.message_attributes(params.get("MessageSystemAttributes"),
                                       "MessageSystemAttributes")
    if system and set(system) != {"AWSTraceHeader"}:
        raise InvalidParameterError("MessageSystemAttributes", sorted(system),
                                    "only AWSTraceHeader may be sent")
    # The body's MD5 is made once: answered here, and stored with the message so that each
    # receive answers it without hashing the body again (an encrypted queue's sealing
    # drops it: server/sealing.py).
    return SendEntry(
        body, delay_seconds=delay,
        attributes=shapes.message_attributes(params.get("MessageAttributes")),
        group_id=params.get("MessageGroupId"), dedup_id=params.get("MessageDeduplicationId"),
        sender=ctx.sender, system_attributes=system, body_md5=shapes.body_digest(body),
    )


def _sent(entry: SendEntry, result: Any) -> dict[str, Any]:
    digest = entry.body_md5 if entry.body_md5 is not None else shapes.body_digest(entry.body)
    out: dict[str, Any] = {"MessageId": result.message_id, "MD5OfMessageBody": digest.hex()}
    if entry.attributes:
        out["MD5OfMessageAttributes"] = shapes.md5_of_attributes(entry.attributes)
    if entry.system_attributes:
        out["MD5OfMessageSystemAttributes"] = shapes.md5_of_attributes(
            entry.system_attributes)
    if result.sequence_number is not None:
        out["SequenceNumber"] = result.sequence_number
    return out


async def send_message(ctx: Context, params: Params) -> dict[str, Any]:
    account, name = _queue(ctx, params)
    entry = _send_entry(ctx, params)
    [result] = await ctx.service.send(account, name, [entry])
    if isinstance(result, EngineError):
        raise result
    return _sent(entry, result)


async def send_message_batch(ctx: Context, params: Params) -> dict[str, Any]:
    account, name = _queue(ctx, params)
    entries = _entries(params)
    await ctx.service.record(account, name)  # an unknown queue fails the whole request
    prepared: list[SendEntry | EngineError] = []
    total = 0
    for raw in entries:
        try:
            entry = _send_entry(ctx, raw)
        except EngineError as exc:
            prepared.append(exc)
            continue
        # SQS limits the batch by its messages' sizes, attributes included.
        total += message_bytes(entry.body, entry.attributes)
        prepared.append(entry)
    if total > MESSAGE_BYTES_MAX:
        raise BatchTooLongError(total, MESSAGE_BYTES_MAX)
    successful: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    results = await ctx.service.send(account, name, prepared)
    for raw, item, result in zip(entries, prepared, results, strict=True):
        if isinstance(result, EngineError):
            failed.append(_failure(raw["Id"], result))
        else:  # a result, so the entry was sent
            successful.append({"Id": raw["Id"], **_sent(cast(SendEntry, item), result)})
    return {"Successful": successful, "Failed": failed}


async def receive_message(ctx: Context, params: Params) -> dict[str, Any]:
    account, name = _queue(ctx, params)
    count = _int(params, "MaxNumberOfMessages", 1, RECEIVE_MESSAGES_MAX) or 1
    wait = _int(params, "WaitTimeSeconds", 0, RECEIVE_WAIT_S_MAX)
    visibility = _int(params, "VisibilityTimeout", 0, VISIBILITY_TIMEOUT_S_MAX)
    system = shapes.wanted_attribute_names(params.get("AttributeNames"), "AttributeNames")
    system |= shapes.wanted_attribute_names(params.get("MessageSystemAttributeNames"),
                                            "MessageSystemAttributeNames")
    unknown = system - shapes.SYSTEM_ATTRIBUTE_NAMES
    if unknown:
        raise InvalidParameterError("MessageSystemAttributeNames", sorted(unknown)[0],
                                    "is not a message system attribute")
    names = shapes.wanted_attribute_names(params.get("MessageAttributeNames"),
                                          "MessageAttributeNames")
    attempt = params.get("ReceiveRequestAttemptId")
    key = None
    if attempt is not None and shapes.is_fifo_name(name):
        if not isinstance(attempt, str) or not 1 <= len(attempt) <= 128:
            raise InvalidParameterError("ReceiveRequestAttemptId", attempt,
                                        "must be 1..128 characters")
        key = (f"{account}/{name}", attempt)
        remembered = await ctx.remembered(*key)
        if remembered is not None:
            # A retried receive gets the same messages and receipts back (SQS FIFO).
            return remembered
    messages = await ctx.service.receive(account, name, count, wait, visibility)
    result = {"Messages": [shapes.received(m, system, names, ctx.region, account)
                           for m in messages]} if messages else {}
    if key is not None:
        await ctx.remember(*key, result)
    return result


async def delete_message(ctx: Context, params: Params) -> dict[str, Any]:
    account, name = _queue(ctx, params)
    [error] = await ctx.service.delete(account, name, [_text(params, "ReceiptHandle")])
    if error is not None:
        raise error
    return {}


async def delete_message_batch(ctx: Context, params: Params) -> dict[str, Any]:
    account, name = _queue(ctx, params)
    entries = _entries(params)
    await ctx.service.record(account, name)
    handles = [h if isinstance(h := e.get("ReceiptHandle"), str)
               else MissingParameterError("ReceiptHandle", "each entry needs one")
               for e in entries]
    return _outcome(entries, await ctx.service.delete(account, name, handles))


async def change_message_visibility(ctx: Context, params: Params) -> dict[str, Any]:
    account, name = _queue(ctx, params)
    seconds = _int(params, "VisibilityTimeout", 0, VISIBILITY_TIMEOUT_S_MAX)
    if seconds is None:
        raise MissingParameterError("VisibilityTimeout", "the request needs VisibilityTimeout")
    [error] = await ctx.service.change_visibility(
        account, name, [(_text(params, "ReceiptHandle"), seconds)])
    if error is not None:
        raise error
    return {}


async def change_message_visibility_batch(ctx: Context, params: Params) -> dict[str, Any]:
    account, name = _queue(ctx, params)
    await ctx.service.record(account, name)
    entries = _entries(params)
    changes: list[tuple[str, int] | EngineError] = []
    for entry in entries:
        try:
            seconds = _int(entry, "VisibilityTimeout", 0, VISIBILITY_TIMEOUT_S_MAX)
            if seconds is None:
                raise MissingParameterError("VisibilityTimeout", "each entry needs one")
            changes.append((_text(entry, "ReceiptHandle"), seconds))
        except EngineError as exc:
            changes.append(exc)
    return _outcome(entries, await ctx.service.change_visibility(account, name, changes))


# --- dead-letter redrive --------------------------------------------------------------------


async def start_message_move_task(ctx: Context, params: Params) -> dict[str, Any]:
    source = shapes.parse_arn(params.get("SourceArn"), "SourceArn")
    _own(ctx, *source)
    answer = await ctx.at_home("/".join(source), "StartMessageMoveTask", params)
    if answer is not None:
        return answer
    destination = None
    if params.get("DestinationArn"):
        destination = shapes.parse_arn(params.get("DestinationArn"), "DestinationArn")
        _own(ctx, *destination)
    rate = _int(params, "MaxNumberOfMessagesPerSecond", 1, 500)
    return {"TaskHandle": await ctx.service.moves.start(source, destination, rate)}


async def list_message_move_tasks(ctx: Context, params: Params) -> dict[str, Any]:
    account, name = shapes.parse_arn(params.get("SourceArn"), "SourceArn")
    _own(ctx, account, name)
    answer = await ctx.at_home(f"{account}/{name}", "ListMessageMoveTasks", params)
    if answer is not None:
        return answer
    limit = _int(params, "MaxResults", 1, 10) or 1
    record = await ctx.service.record(account, name)
    results = []
    for task in ctx.service.moves.list(record.engine_name, limit):
        item: dict[str, Any] = {
            "Status": task.status,
            "SourceArn": shapes.queue_arn(ctx.region, account, name),
            "MaxNumberOfMessagesPerSecond": task.rate,
            "ApproximateNumberOfMessagesMoved": task.moved,
            "ApproximateNumberOfMessagesToMove": task.to_move,
            "StartedTimestamp": task.started_ms,
        }
        if task.status == "RUNNING":
            item["TaskHandle"] = task.handle
        if task.destination is not None:
            dest_account, _, dest = task.destination.partition("/")
            item["DestinationArn"] = shapes.queue_arn(ctx.region, dest_account, dest)
        if task.failure is not None:
            item["FailureReason"] = task.failure
        results.append(item)
    return {"Results": results}


async def cancel_message_move_task(ctx: Context, params: Params) -> dict[str, Any]:
    handle = _text(params, "TaskHandle")
    source = task_source(handle)
    answer = None if source is None else await ctx.at_home(source, "CancelMessageMoveTask",
                                                           params)
    if answer is not None:
        return answer
    task = await ctx.service.moves.cancel(handle, ctx.account)
    return {"ApproximateNumberOfMessagesMoved": task.moved}


def _own(ctx: Context, account: str, name: str) -> None:
    # Move tasks are the owner's alone: another account learns nothing of the queue.
    if account != ctx.account:
        raise QueueNotFoundError(name)


# --- permissions ----------------------------------------------------------------------------


async def add_permission(ctx: Context, params: Params) -> dict[str, Any]:
    account, name = _queue(ctx, params)
    await ctx.service.record(account, name)  # an unknown queue is refused first
    await ctx.service.add_permission(account, name, ctx.region, _text(params, "Label"),
                                     _string_list(params, "AWSAccountIds"),
                                     _string_list(params, "Actions"))
    return {}


async def remove_permission(ctx: Context, params: Params) -> dict[str, Any]:
    account, name = _queue(ctx, params)
    await ctx.service.record(account, name)  # an unknown queue is refused first
    await ctx.service.remove_permission(account, name, _text(params, "Label"))
    return {}


def _string_list(params: Params, name: str) -> list[str]:
    value = params.get(name)
    if value is None:
        raise MissingParameterError(name, f"the request needs {name}")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidParameterError(name, value, "must be a list of strings")
    return value


ACTIONS: dict[str, Action] = {
    "CreateQueue": create_queue,
    "GetQueueUrl": get_queue_url,
    "ListQueues": list_queues,
    "DeleteQueue": delete_queue,
    "GetQueueAttributes": get_queue_attributes,
    "SetQueueAttributes": set_queue_attributes,
    "TagQueue": tag_queue,
    "UntagQueue": untag_queue,
    "ListQueueTags": list_queue_tags,
    "PurgeQueue": purge_queue,
    "ListDeadLetterSourceQueues": list_dead_letter_source_queues,
    "SendMessage": send_message,
    "SendMessageBatch": send_message_batch,
    "ReceiveMessage": receive_message,
    "DeleteMessage": delete_message,
    "DeleteMessageBatch": delete_message_batch,
    "ChangeMessageVisibility": change_message_visibility,
    "ChangeMessageVisibilityBatch": change_message_visibility_batch,
    "StartMessageMoveTask": start_message_move_task,
    "ListMessageMoveTasks": list_message_move_tasks,
    "CancelMessageMoveTask": cancel_message_move_task,
    "AddPermission": add_permission,
    "RemovePermission": remove_permission,
}

# Actions whose QueueUrl names the queue (for the audit log and metrics).
QUEUE_FROM_URL = {name for name in ACTIONS if name not in (
    "CreateQueue", "GetQueueUrl", "ListQueues", "StartMessageMoveTask",
    "ListMessageMoveTasks", "CancelMessageMoveTask")}

