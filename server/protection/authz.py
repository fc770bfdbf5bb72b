"""Authorization: may this caller do this action on this queue?

A queue belongs to the account that created it, and every principal of that account may do
anything with it (there are no per-principal policies inside an account). Another account
may use it only as the queue's policy allows: the SQS ``Policy`` attribute, written
directly or by AddPermission / RemovePermission (and the native API's permission routes),
in the IAM policy language SQS uses, limited to what can be evaluated exactly here:
``Effect`` Allow or Deny, ``Principal`` ``"*"`` or AWS account ids / ARNs, ``Action``
names and ``Resource`` queue ARNs with ``*`` and ``?`` wildcards. A policy that uses
anything else (Condition, NotAction, NotPrincipal) is refused when it is set, rather than
half-enforced. As on SQS, no policy grants another account the owner's actions
(:data:`OWNER_ONLY`): changing the queue's attributes, policy or tags, listing its tags,
deleting it, moving its messages.

A policy is bounded as SQS bounds it (bytes, statements, principals, actions per
statement) when it is set, and evaluated from a :class:`CompiledPolicy`: made once per
queue record (``QueueRecord.policy``), with each statement's Resource already matched
against the queue, and its Action matched once per action asked about, so a
cross-account request costs a dict lookup and a few set lookups, never a pattern match.

A refusal looks exactly like a queue that does not exist, so another account learns
nothing about which queues an account has.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Iterable
from typing import Any

from engine.errors import InvalidAttributeError, InvalidParameterError, QueueNotFoundError
from server.errors import OverLimitError
from server.sqs.shapes import queue_arn
from server.web.params import parse_json, utf8_bytes

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
# SQS's policy quotas, so that a policy SQS takes is taken here and one it refuses is
# refused here. They also bound what a queue owner can make the server keep and evaluate:
# the policy text sits in every cached record of the queue. (SQS also allows 10
# Conditions; Condition is refused outright here, see above.)
POLICY_BYTES_MAX = 8192
STATEMENTS_MAX = 20
PRINCIPALS_MAX = 50
"""Principal entries in the whole policy ("*" counts as one)."""
ACTIONS_PER_STATEMENT_MAX = 7
_LABEL = re.compile(r"[A-Za-z0-9_-]{1,80}")
_ACCOUNT = re.compile(r"[0-9]{12}")
_PRINCIPAL_ARN = re.compile(r"arn:aws:iam::([0-9]{12}):.+")
# arn:aws:sqs:REGION:ACCOUNT:NAME, each part possibly with * and ? wildcards.
_QUEUE_ARN = re.compile(r"arn:aws:sqs:[^:]*:([^:]+):([^:]+)")
_BATCH_OF = {"SendMessageBatch": "SendMessage", "DeleteMessageBatch": "DeleteMessage",
             "ChangeMessageVisibilityBatch": "ChangeMessageVisibility"}
_KNOWN_KEYS = {"Sid", "Effect", "Principal", "Action", "Resource"}
# Actions whose applicable statements a compiled policy remembers. Callers ask about the
# few SQS actions another account may perform; the bound keeps the memo small whatever
# they ask.
_ACTIONS_REMEMBERED = 32


def is_account(value: object) -> bool:
    return isinstance(value, str) and _ACCOUNT.fullmatch(value) is not None


# (allow, principal accounts or {"*"}, action patterns, (account, name) resource patterns)
_Statement = tuple[bool, frozenset[str], tuple[str, ...], tuple[tuple[str, str], ...]]


class CompiledPolicy:
    """A queue's policy, ready to evaluate for that queue: the statements whose Resource
    names the queue (matched once, here), and per action asked about, the (allow,
    principals) of the statements whose Action covers it (matched once per action)."""

    __slots__ = ("_by_action", "_statements")

    def __init__(self, statements: Iterable[tuple[bool, frozenset[str], tuple[str, ...]]]
                 ) -> None:
        self._statements = tuple(statements)
        self._by_action: dict[str, tuple[tuple[bool, frozenset[str]], ...]] = {}

    def allows(self, account: str, action: str) -> bool:
        """True if a statement allows ``account`` the (non-batch) ``action`` and none
        denies it."""
        applicable = self._by_action.get(action)
        if applicable is None:
            wanted = f"sqs:{action}".lower()
            applicable = tuple((allow, principals)
                               for allow, principals, actions in self._statements
                               if any(_matches(p, wanted) for p in actions))
            if len(self._by_action) < _ACTIONS_REMEMBERED:
                self._by_action[action] = applicable
        verdict = False
        for allow, principals in applicable:
            if "*" in principals or account in principals:
                if not allow:
                    return False  # an explicit Deny wins over any Allow
                verdict = True
        return verdict


_GRANTS_NOTHING = CompiledPolicy(())


def compile_policy(policy: str | None, owner: str, name: str) -> CompiledPolicy | None:
    """The policy of the queue ``owner``/``name`` ready to evaluate; None for no policy.

    A stored policy is compiled without its limits (one kept before they applied still
    grants what it said); one that no longer parses grants nothing: it fails closed.
    """
    if not policy:
        return None
    try:
        _, statements = _parse(policy, limits=False)
    except InvalidAttributeError:
        return _GRANTS_NOTHING
    applicable = []
    for allow, principals, actions, resources in statements:
        if any(_matches(account, owner) and _matches(queue, name)
               for account, queue in resources):
            applicable.append((allow, principals, actions))
    return CompiledPolicy(applicable)


def allowed(owner: str, name: str, caller_account: str, action: str,
            policy: str | CompiledPolicy | None) -> bool:
    """True if the caller's account owns the queue ``owner``/``name`` or the policy (its
    text, or compiled for this queue) grants the action on it."""
    if caller_account == owner:
        return True
    if policy is None or policy == "" or action in OWNER_ONLY:
        return False
    if isinstance(policy, str):
        policy = compile_policy(policy, owner, name)
        assert policy is not None  # not empty, so compiled
    return policy.allows(caller_account, _BATCH_OF.get(action, action))


def check(owner: str, name: str, caller_account: str, action: str,
          policy: str | CompiledPolicy | None) -> None:
    if not allowed(owner, name, caller_account, action, policy):
        raise QueueNotFoundError(name)


def parse(policy: str, *, limits: bool = True) -> dict[str, Any]:
    """The policy as a dict, or InvalidAttributeValue naming what cannot be enforced or
    which limit it breaks (``limits=False``: a stored policy, evaluated as it was kept)."""
    return _parse(policy, limits)[0]


def _parse(policy: str, limits: bool) -> tuple[dict[str, Any], list[_Statement]]:
    """The policy as a dict, and its statements made evaluable."""
    size = utf8_bytes(policy)
    if limits and size > POLICY_BYTES_MAX:
        # Refused before it is parsed: its size alone decides.
        raise InvalidAttributeError("Policy", f"{size} bytes",
                                    f"a policy is at most {POLICY_BYTES_MAX} bytes")
    try:
        document = parse_json(policy)
    except ValueError as exc:  # too deep nesting included: a 400, never a 500
        raise InvalidAttributeError("Policy", policy, f"must be a JSON object ({exc})"
                                    ) from None
    if not isinstance(document, dict):
        raise InvalidAttributeError("Policy", policy, "must be a JSON object")
    statements = document.get("Statement", [])
    if isinstance(statements, dict):
        statements = [statements]
        document["Statement"] = statements
    if not isinstance(statements, list) or (limits and len(statements) > STATEMENTS_MAX):
        raise InvalidAttributeError("Policy", policy,
                                    f"Statement must be a list of at most {STATEMENTS_MAX}")
    evaluable = [_statement(statement) for statement in statements]
    if limits and (broken := over_limit(document, size)) is not None:
        raise InvalidAttributeError("Policy", policy, broken)
    return document, evaluable


def over_limit(document: dict[str, Any], size: int) -> str | None:
    """Which of SQS's policy quotas a parsed (valid) policy of ``size`` bytes breaks, if
    any."""
    statements = document.get("Statement", [])
    if size > POLICY_BYTES_MAX:
        return f"a policy is at most {POLICY_BYTES_MAX} bytes"
    if len(statements) > STATEMENTS_MAX:
        return f"a policy holds at most {STATEMENTS_MAX} statements"
    principals = 0
    for statement in statements:
        actions = statement["Action"]
        if not isinstance(actions, str) and len(actions) > ACTIONS_PER_STATEMENT_MAX:
            return f"a statement names at most {ACTIONS_PER_STATEMENT_MAX} actions"
        principal = statement["Principal"]
        entries = principal["AWS"] if isinstance(principal, dict) else principal
        principals += 1 if isinstance(entries, str) else len(entries)
    if principals > PRINCIPALS_MAX:
        return f"a policy names at most {PRINCIPALS_MAX} principals"
    return None


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


def _matches(pattern: str, text: str) -> bool:
    """``text`` matches a policy pattern: ``*`` any run of characters, ``?`` any one.

    Called only while a policy is compiled (once per queue record) or first asked about an
    action, never per request. The usual patterns (a name, ``*``, a prefix and ``*``)
    are compared directly; others go through fnmatch's translation, whose ``*`` is an
    atomic group, so that no pattern backtracks without end. A ``[`` is made literal, as
    it is in IAM, where fnmatch would start a character class.
    """
    if pattern == "*":
        return True
    prefix = pattern.endswith("*")
    stem = pattern[:-1] if prefix else pattern
    if "*" not in stem and "?" not in stem:
        return text.startswith(stem) if prefix else text == stem
    return re.match(fnmatch.translate(pattern.replace("[", "[[]")), text) is not None


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
        value = "*"
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
    # The policy as kept (a policy kept before the limits applied can still be read); the
    # limits hold for what this grant makes of it.
    document: dict[str, Any] = parse(policy, limits=False) if policy else {
        "Version": "2012-10-17", "Id": f"{arn}/SQSDefaultPolicy", "Statement": []}
    if any(s.get("Sid") == label for s in document["Statement"]):
        raise InvalidParameterError("Label", label, "already exists")
    principals = [f"arn:aws:iam::{a}:root" for a in accounts]
    granted = [f"SQS:{a}" for a in actions]
    document["Statement"].append({
        "Sid": label, "Effect": "Allow",
        "Principal": {"AWS": principals[0] if len(principals) == 1 else principals},
        "Action": granted[0] if len(granted) == 1 else granted, "Resource": arn})
    text = json.dumps(document, separators=(",", ":"))
    broken = over_limit(document, utf8_bytes(text))
    if broken is not None:
        raise OverLimitError(f"permission {label!r}", broken)  # what SQS answers
    return text


def remove_permission(policy: str | None, label: str) -> str:
    """The policy without the statement labelled ``label``; "" when none remain."""
    _check_label(label)
    # Without the limits: removing a grant must work on any policy kept, and only shrinks it.
    document = parse(policy, limits=False) if policy else {"Statement": []}
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
