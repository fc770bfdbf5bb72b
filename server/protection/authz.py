"""Authorization: may this caller do this action on this queue?

A queue belongs to the account that created it, and every principal of that account may do
anything with it (there are no per-principal policies inside an account). Another account
may use it only as the queue's policy allows: the SQS ``Policy`` attribute, written
directly or by AddPermission / RemovePermission (and the native API's permission routes),
in the IAM policy language SQS uses, limited to what can be evaluated exactly here:
``Effect`` Allow or Deny, ``Principal`` ``"*"`` or AWS account ids / ARNs, ``Action``
names and ``Resource`` queue ARNs with ``*`` wildcards. A policy that uses anything else
(Condition, NotAction, NotPrincipal) is refused when it is set, rather than
half-enforced. As on SQS, no policy
grants another account the owner's actions (:data:`OWNER_ONLY`): changing the queue's
attributes, policy or tags, listing its tags, deleting it, moving its messages.

A refusal looks exactly like a queue that does not exist, so another account learns
nothing about which queues an account has.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import re
from collections.abc import Iterable
from typing import Any

from engine.errors import InvalidAttributeError, InvalidParameterError, QueueNotFoundError
from server.sqs.shapes import queue_arn

# What AddPermission may grant, as SQS allows: each also covers its batch form.
GRANTABLE = frozenset({"SendMessage", "ReceiveMessage", "DeleteMessage",
                       "ChangeMessageVisibility", "GetQueueAttributes", "GetQueueUrl"})
# The actions SQS documents as ones "cross-account permissions don't apply to": a grant
# of "*" or "sqs:*" must not let another account rewrite the policy that granted it,
# delete the queue or retag it.
OWNER_ONLY = frozenset({"AddPermission", "RemovePermission", "SetQueueAttributes",
                        "DeleteQueue", "TagQueue", "UntagQueue", "ListQueueTags",
                        "CreateQueue", "ListQueues", "StartMessageMoveTask",
                        "CancelMessageMoveTask", "ListMessageMoveTasks"})
LABEL_CHARS_MAX = 80
STATEMENTS_MAX = 100
_LABEL = re.compile(r"[A-Za-z0-9_-]{1,80}")
_ACCOUNT = re.compile(r"[0-9]{12}")
_PRINCIPAL_ARN = re.compile(r"arn:aws:iam::([0-9]{12}):.+")
# arn:aws:sqs:REGION:ACCOUNT:NAME, each part possibly with * and ? wildcards.
_QUEUE_ARN = re.compile(r"arn:aws:sqs:[^:]*:([^:]+):([^:]+)")
_BATCH_OF = {"SendMessageBatch": "SendMessage", "DeleteMessageBatch": "DeleteMessage",
             "ChangeMessageVisibilityBatch": "ChangeMessageVisibility"}
_KNOWN_KEYS = {"Sid", "Effect", "Principal", "Action", "Resource"}


def is_account(value: object) -> bool:
    return isinstance(value, str) and _ACCOUNT.fullmatch(value) is not None


def allowed(owner: str, name: str, caller_account: str, action: str,
            policy: str | None) -> bool:
    """True if the caller's account owns the queue ``owner``/``name`` or the policy grants
    the action on it."""
    if caller_account == owner:
        return True
    if not policy or action in OWNER_ONLY:
        return False
    return _decide(policy, caller_account, _BATCH_OF.get(action, action), owner, name)


def check(owner: str, name: str, caller_account: str, action: str, policy: str | None) -> None:
    if not allowed(owner, name, caller_account, action, policy):
        raise QueueNotFoundError(name)


# (allow, principal accounts or {"*"}, action patterns, (account, name) resource patterns)
_Statement = tuple[bool, frozenset[str], tuple[str, ...], tuple[tuple[str, str], ...]]


@functools.lru_cache(maxsize=4096)
def _statements(policy: str) -> tuple[_Statement, ...]:
    """Each statement, evaluable; cached because the same policy string is evaluated on
    every cross-account request."""
    return tuple(_statement(s) for s in parse(policy)["Statement"])


def _decide(policy: str, account: str, action: str, owner: str, name: str) -> bool:
    verdict = False
    wanted = f"sqs:{action}".lower()
    for allow, principals, actions, resources in _statements(policy):
        if ("*" in principals or account in principals) and any(
                fnmatch.fnmatchcase(wanted, pattern) for pattern in actions) and any(
                fnmatch.fnmatchcase(owner, in_account) and fnmatch.fnmatchcase(name, queue)
                for in_account, queue in resources):
            if not allow:
                return False  # an explicit Deny wins over any Allow
            verdict = True
    return verdict


def parse(policy: str) -> dict[str, Any]:
    """The policy as a dict, or InvalidAttributeValue naming what cannot be enforced."""
    try:
        document = json.loads(policy)
    except ValueError:
        raise InvalidAttributeError("Policy", policy, "must be a JSON object") from None
    if not isinstance(document, dict):
        raise InvalidAttributeError("Policy", policy, "must be a JSON object")
    statements = document.get("Statement", [])
    if isinstance(statements, dict):
        statements = [statements]
        document["Statement"] = statements
    if not isinstance(statements, list) or len(statements) > STATEMENTS_MAX:
        raise InvalidAttributeError("Policy", policy,
                                    f"Statement must be a list of at most {STATEMENTS_MAX}")
    for statement in statements:
        _statement(statement)
    return document


def _statement(statement: object) -> _Statement:
    def refuse(reason: str) -> InvalidAttributeError:
        return InvalidAttributeError("Policy", json.dumps(statement), reason)

    if not isinstance(statement, dict):
        raise refuse("each statement must be an object")
    unknown = set(statement) - _KNOWN_KEYS
    if unknown:
        raise refuse(f"{sorted(unknown)[0]} is not supported: only Effect, Principal, "
                     "Action and Resource are evaluated")
    effect = statement.get("Effect")
    if effect not in ("Allow", "Deny"):
        raise refuse("Effect must be Allow or Deny")
    return (effect == "Allow", _principals(statement.get("Principal"), refuse),
            tuple(_action_pattern(a, refuse) for a in _strings(statement.get("Action"), refuse)),
            _resources(statement.get("Resource"), refuse))


def _strings(value: object, refuse: Any) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise refuse("Principal, Action and Resource must be a string or a list of strings")
    return values


def _principals(value: object, refuse: Any) -> frozenset[str]:
    if value == "*":
        return frozenset({"*"})
    if not isinstance(value, dict) or set(value) != {"AWS"}:
        raise refuse('Principal must be "*" or {"AWS": account ids or ARNs}')
    accounts = set()
    for item in _strings(value["AWS"], refuse):
        if item == "*" or _ACCOUNT.fullmatch(item):
            accounts.add(item)
        elif match := _PRINCIPAL_ARN.fullmatch(item):
            accounts.add(match.group(1))
        else:
            raise refuse(f"principal {item!r} is not an account id or an IAM ARN")
    return frozenset(accounts)


def _resources(value: object, refuse: Any) -> tuple[tuple[str, str], ...]:
    """(account, queue name) patterns. Evaluated, not merely accepted: a statement naming
    another queue must grant nothing on this one. The region is not compared (a server
    serves one). No Resource: the queue whose policy it is."""
    if value is None:
        return (("*", "*"),)
    patterns = []
    for item in _strings(value, refuse):
        if item == "*":
            patterns.append(("*", "*"))
        elif match := _QUEUE_ARN.fullmatch(item):
            patterns.append((match.group(1), match.group(2)))
        else:
            raise refuse(f"resource {item!r} is not * or an SQS queue ARN")
    return tuple(patterns)


def _action_pattern(action: str, refuse: Any) -> str:
    if action == "*":
        return "sqs:*"
    if not action.lower().startswith("sqs:"):
        raise refuse(f"action {action!r} is not an SQS action")
    return action.lower()


# --- AddPermission / RemovePermission ------------------------------------------------------


def add_permission(policy: str | None, region: str, owner: str, name: str, label: str,
                   accounts: Iterable[str], actions: Iterable[str]) -> str:
    """The queue's policy with a statement granting actions to accounts, as SQS writes it."""
    _check_label(label)
    accounts, actions = list(accounts), list(actions)
    if not accounts:
        raise InvalidParameterError("AWSAccountIds", accounts, "name at least one account")
    for account in accounts:
        if not isinstance(account, str) or not _ACCOUNT.fullmatch(account):
            raise InvalidParameterError("AWSAccountIds", account, "must be 12 digits")
    if not actions:
        raise InvalidParameterError("Actions", actions, "name at least one action")
    for action in actions:
        if action != "*" and action not in GRANTABLE:
            raise InvalidParameterError("Actions", action,
                                        f"must be * or one of {', '.join(sorted(GRANTABLE))}")
    arn = queue_arn(region, owner, name)
    document: dict[str, Any] = parse(policy) if policy else {
        "Version": "2012-10-17", "Id": f"{arn}/SQSDefaultPolicy", "Statement": []}
    if any(s.get("Sid") == label for s in document["Statement"]):
        raise InvalidParameterError("Label", label, "already exists")
    principals = [f"arn:aws:iam::{a}:root" for a in accounts]
    granted = [f"SQS:{a}" for a in actions]
    document["Statement"].append({
        "Sid": label, "Effect": "Allow",
        "Principal": {"AWS": principals[0] if len(principals) == 1 else principals},
        "Action": granted[0] if len(granted) == 1 else granted, "Resource": arn})
    if len(document["Statement"]) > STATEMENTS_MAX:
        raise InvalidParameterError("Label", label,
                                    f"a queue policy holds at most {STATEMENTS_MAX} statements")
    return json.dumps(document, separators=(",", ":"))


def remove_permission(policy: str | None, label: str) -> str:
    """The policy without the statement labelled ``label``; "" when none remain."""
    _check_label(label)
    document = parse(policy) if policy else {"Statement": []}
    remaining = [s for s in document["Statement"] if s.get("Sid") != label]
    if len(remaining) == len(document["Statement"]):
        raise InvalidParameterError("Label", label, "no permission has this label")
    if not remaining:
        return ""
    document["Statement"] = remaining
    return json.dumps(document, separators=(",", ":"))


def _check_label(label: object) -> None:
    if not isinstance(label, str) or not _LABEL.fullmatch(label):
        raise InvalidParameterError("Label", label,
                                    f"must be 1..{LABEL_CHARS_MAX} of A-Z a-z 0-9 _ -")
