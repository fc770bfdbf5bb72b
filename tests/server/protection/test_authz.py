"""Authorization across accounts, against a real `conveyor serve --auth required`, and
server/protection/authz.py's policy language in process.

Three accounts, each with its own key. A queue belongs to the account that created it;
another account may use it only as its policy grants (AddPermission, the native
permission routes, or a Policy attribute), and never for the actions SQS keeps to the
owner (changing the queue's attributes, policy or tags, deleting it, listing its tags).
Whatever another account is refused, it is refused exactly as a queue that does not exist
is, so that it learns nothing about which queues an account has.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import pytest
from botocore.exceptions import ClientError

from engine.errors import InvalidAttributeError, InvalidParameterError, QueueNotFoundError
from server.errors import OverLimitError
from server.protection import authz
from server.protection.auth import bearer_token
from tests.server.protection.test_auth import form_call
from tests.support.clients import Reply, native
from tests.support.server import Server, module_server, restarted_if_dead

ALICE, BOB, CAROL = "111111111111", "222222222222", "333333333333"
REGION = "us-east-1"
NON_EXISTENT = "AWS.SimpleQueueService.NonExistentQueue"
# A policy change is written through the server's metadata cache; a poll this long would
# still cover a cache with a lifetime.
POLICY_EFFECT_S = 10

# The actions SQS never lets another account perform, whatever the queue's policy says.
OWNER_ONLY_CALLS: list[tuple[str, dict[str, Any]]] = [
    ("set_queue_attributes", {"Attributes": {"VisibilityTimeout": "5"}}),
    ("set_queue_attributes", {"Attributes": {"Policy": ""}}),
    ("tag_queue", {"Tags": {"stolen": "yes"}}),
    ("untag_queue", {"TagKeys": ["team"]}),
    ("list_queue_tags", {}),
    ("add_permission", {"Label": "takeover", "AWSAccountIds": [BOB], "Actions": ["*"]}),
    ("remove_permission", {"Label": "everything"}),
    ("delete_queue", {}),
]


# --- the server and its callers -------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with module_server(tmp_path_factory, "authz", fsync="never",
                       extra=("--auth", "required")) as running:
        yield running


@pytest.fixture
def srv(shared: Server) -> Server:
    return restarted_if_dead(shared)


@pytest.fixture(scope="module")
def keys(shared: Server) -> dict[str, dict[str, str]]:
    return {account: shared.create_key(name, account)
            for name, account in (("alice", ALICE), ("bob", BOB), ("carol", CAROL))}


@pytest.fixture
def alice(srv: Server, keys: dict[str, dict[str, str]]) -> Any:
    return srv.sqs(keys[ALICE])


@pytest.fixture
def bob(srv: Server, keys: dict[str, dict[str, str]]) -> Any:
    return srv.sqs(keys[BOB])


@pytest.fixture
def carol(srv: Server, keys: dict[str, dict[str, str]]) -> Any:
    return srv.sqs(keys[CAROL])


def token(keys: dict[str, dict[str, str]], account: str) -> str:
    key = keys[account]
    return bearer_token(key["access_key_id"], key["secret_access_key"], int(time.time()) + 600)


_names = iter(range(1_000_000))


def fresh(prefix: str) -> str:
    """A queue name no other test uses on the shared server."""
    return f"{prefix}-{next(_names)}"


def refusal(call: Callable[..., Any], **kwargs: Any) -> dict[str, Any]:
    """What a failing boto3 call reported: status, codes, type and message."""
    try:
        result = call(**kwargs)
    except ClientError as exc:
        response = exc.response
        return {"status": response["ResponseMetadata"]["HTTPStatusCode"],
                "query_error": response["ResponseMetadata"]["HTTPHeaders"].get(
                    "x-amzn-query-error"),
                **response["Error"]}
    pytest.fail(f"{call.__name__}({kwargs}) succeeded: {result}")


def not_found(name: str) -> dict[str, Any]:
    """Exactly what SQS clients get for a queue that does not exist."""
    return {"status": 400, "query_error": f"{NON_EXISTENT};Sender", "Code": NON_EXISTENT,
            "QueryErrorCode": "QueueDoesNotExist", "Type": "Sender",
            "Message": f"queue {name!r} does not exist"}


def assert_hidden(call: Callable[..., Any], name: str, **kwargs: Any) -> None:
    assert refusal(call, **kwargs) == not_found(name), (call.__name__, kwargs)


def eventually(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + POLICY_EFFECT_S
    while not condition():
        assert time.monotonic() < deadline, f"not within {POLICY_EFFECT_S} s: {what}"
        time.sleep(0.05)


def can_send(sqs: Any, url: str) -> bool:
    try:
        sqs.send_message(QueueUrl=url, MessageBody="probe")
    except ClientError as exc:
        assert exc.response["Error"]["Code"] == NON_EXISTENT, exc.response
        return False
    return True


def policy_of(sqs: Any, url: str) -> dict[str, Any] | None:
    text = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["Policy"]).get(
        "Attributes", {}).get("Policy")
    return json.loads(text) if text else None


def statement(sid: str, effect: str, principal: Any, action: Any) -> dict[str, Any]:
    return {"Sid": sid, "Effect": effect, "Principal": principal, "Action": action,
            "Resource": "*"}


def policy(*statements: dict[str, Any]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


# --- nothing leaks ----------------------------------------------------------------------------


def test_another_accounts_queue_looks_exactly_like_no_queue(srv: Server, alice: Any,
                                                            bob: Any) -> None:
    name, absent = fresh("private"), fresh("never-created")
    url = alice.create_queue(QueueName=name, tags={"team": "a"})["QueueUrl"]
    alice.send_message(QueueUrl=url, MessageBody="alice's secret")
    absent_url = f"{srv.url}/{ALICE}/{absent}"

    assert_hidden(bob.get_queue_url, name, QueueName=name, QueueOwnerAWSAccountId=ALICE)
    assert_hidden(bob.get_queue_url, absent, QueueName=absent, QueueOwnerAWSAccountId=ALICE)
    # Bob's own namespace has no such queue either.
    assert_hidden(bob.get_queue_url, name, QueueName=name)
    receipt = "AQEB" + "x" * 40
    calls: list[tuple[str, dict[str, Any]]] = [
        ("send_message", {"MessageBody": "intruder"}),
        ("send_message_batch", {"Entries": [{"Id": "1", "MessageBody": "intruder"}]}),
        ("receive_message", {"MaxNumberOfMessages": 10}),
        ("delete_message", {"ReceiptHandle": receipt}),
        ("delete_message_batch", {"Entries": [{"Id": "1", "ReceiptHandle": receipt}]}),
        ("change_message_visibility", {"ReceiptHandle": receipt, "VisibilityTimeout": 0}),
        ("get_queue_attributes", {"AttributeNames": ["All"]}),
        ("purge_queue", {}),
        ("list_dead_letter_source_queues", {}),
        *OWNER_ONLY_CALLS,
    ]
    for method, kwargs in calls:
        for queue, queue_url in ((name, url), (absent, absent_url)):
            assert_hidden(getattr(bob, method), queue, QueueUrl=queue_url, **kwargs)

    # Bob's list shows none of Alice's queues, and a queue of the same name is his own.
    assert not any(f"/{ALICE}/" in u for u in bob.list_queues().get("QueueUrls", []))
    assert bob.list_queues(QueueNamePrefix=name).get("QueueUrls", []) == []
    own = bob.create_queue(QueueName=name)["QueueUrl"]
    assert own == f"{srv.url}/{BOB}/{name}"
    assert "Messages" not in bob.receive_message(QueueUrl=own)

    # Alice's queue is as she left it.
    [message] = alice.receive_message(QueueUrl=url, WaitTimeSeconds=2)["Messages"]
    assert message["Body"] == "alice's secret"
    assert alice.list_queue_tags(QueueUrl=url)["Tags"] == {"team": "a"}
    assert policy_of(alice, url) is None


def test_the_query_protocol_hides_another_accounts_queue_the_same_way(
        srv: Server, alice: Any, keys: dict[str, dict[str, str]]) -> None:
    name, absent = fresh("query-private"), fresh("query-absent")
    alice.create_queue(QueueName=name)
    bodies = []
    for queue in (name, absent):
        for path, fields in ((f"/{ALICE}/{queue}", {"Action": "ReceiveMessage"}),
                             ("/", {"Action": "GetQueueUrl", "QueueName": queue,
                                    "QueueOwnerAWSAccountId": ALICE})):
            reply = form_call(srv, keys[BOB], fields, path=path)
            assert reply.status == 400, reply
            bodies.append(reply.body.decode().replace(queue, "<name>").split("<RequestId>")[0])
    assert bodies[0] == bodies[2] and bodies[1] == bodies[3], bodies
    assert "AWS.SimpleQueueService.NonExistentQueue" in bodies[0]


# --- AddPermission and RemovePermission -------------------------------------------------------


def test_a_send_grant_lets_send_only_until_removed(srv: Server, alice: Any, bob: Any,
                                                   carol: Any) -> None:
    name = fresh("shared-send")
    url = alice.create_queue(QueueName=name)["QueueUrl"]
    alice.add_permission(QueueUrl=url, Label="bob-send", AWSAccountIds=[BOB],
                         Actions=["SendMessage"])
    document = policy_of(alice, url)
    assert document is not None
    [granted] = document["Statement"]
    assert granted == {"Sid": "bob-send", "Effect": "Allow",
                       "Principal": {"AWS": f"arn:aws:iam::{BOB}:root"},
                       "Action": "SQS:SendMessage",
                       "Resource": f"arn:aws:sqs:{REGION}:{ALICE}:{name}"}

    bob.send_message(QueueUrl=url, MessageBody="from bob")
    batch = bob.send_message_batch(QueueUrl=url, Entries=[
        {"Id": "1", "MessageBody": "bob batch 1"}, {"Id": "2", "MessageBody": "bob batch 2"}])
    assert len(batch["Successful"]) == 2 and not batch.get("Failed")
    # Sending is all Bob may do.
    assert_hidden(bob.receive_message, name, QueueUrl=url)
    assert_hidden(bob.get_queue_attributes, name, QueueUrl=url, AttributeNames=["All"])
    assert_hidden(bob.get_queue_url, name, QueueName=name, QueueOwnerAWSAccountId=ALICE)
    assert_hidden(bob.purge_queue, name, QueueUrl=url)
    # And the grant is Bob's alone.
    assert_hidden(carol.send_message, name, QueueUrl=url, MessageBody="from carol")

    received = alice.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=2,
                                     AttributeNames=["SenderId"])["Messages"]
    while len(received) < 3:
        more = alice.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=2,
                                     AttributeNames=["SenderId"]).get("Messages", [])
        assert more, received
        received += more
    assert sorted(m["Body"] for m in received) == ["bob batch 1", "bob batch 2", "from bob"]
    assert {m["Attributes"]["SenderId"] for m in received} == {"bob"}

    alice.remove_permission(QueueUrl=url, Label="bob-send")
    eventually(lambda: not can_send(bob, url), "Bob refused after RemovePermission")
    assert_hidden(bob.send_message, name, QueueUrl=url, MessageBody="again")
    assert policy_of(alice, url) is None
    error = refusal(alice.remove_permission, QueueUrl=url, Label="bob-send")
    assert (error["status"], error["Code"]) == (400, "InvalidParameterValue")


def test_grants_accumulate_by_label(alice: Any, bob: Any, carol: Any) -> None:
    name = fresh("labels")
    url = alice.create_queue(QueueName=name)["QueueUrl"]
    alice.add_permission(QueueUrl=url, Label="bob-send", AWSAccountIds=[BOB],
                         Actions=["SendMessage"])
    alice.add_permission(QueueUrl=url, Label="both-receive", AWSAccountIds=[BOB, CAROL],
                         Actions=["ReceiveMessage", "GetQueueUrl"])
    error = refusal(alice.add_permission, QueueUrl=url, Label="bob-send",
                    AWSAccountIds=[CAROL], Actions=["SendMessage"])
    assert (error["status"], error["Code"]) == (400, "InvalidParameterValue")
    assert "already exists" in error["Message"]
    bob.send_message(QueueUrl=url, MessageBody="x")
    assert bob.get_queue_url(QueueName=name, QueueOwnerAWSAccountId=ALICE)["QueueUrl"] == url
    [message] = carol.receive_message(QueueUrl=url, WaitTimeSeconds=2)["Messages"]
    assert message["Body"] == "x"
    # Carol may receive but not delete what she received.
    assert_hidden(carol.delete_message, name, QueueUrl=url,
                  ReceiptHandle=message["ReceiptHandle"])
    alice.remove_permission(QueueUrl=url, Label="bob-send")
    eventually(lambda: not can_send(bob, url), "Bob's send grant removed")
    # The other label still stands.
    assert bob.get_queue_url(QueueName=name, QueueOwnerAWSAccountId=ALICE)["QueueUrl"] == url


@pytest.mark.parametrize(("label", "accounts", "actions"), [
    ("has space", [BOB], ["SendMessage"]),
    ("x" * 81, [BOB], ["SendMessage"]),
    ("ok", ["12345"], ["SendMessage"]),
    ("ok", ["arn:aws:iam::222222222222:root"], ["SendMessage"]),
    ("ok", [BOB], ["DeleteQueue"]),
    ("ok", [BOB], ["SetQueueAttributes"]),
    ("ok", [BOB], ["AddPermission"]),
    ("ok", [BOB], ["sqs:SendMessage"]),
    ("ok", [], ["SendMessage"]),
    ("ok", [BOB], []),
])
def test_add_permission_refuses_what_sqs_refuses(alice: Any, label: str, accounts: list[str],
                                                 actions: list[str]) -> None:
    url = alice.create_queue(QueueName="refusals")["QueueUrl"]
    error = refusal(alice.add_permission, QueueUrl=url, Label=label, AWSAccountIds=accounts,
                    Actions=actions)
    assert error["status"] == 400 and error["Code"] in ("InvalidParameterValue",
                                                        "MissingParameter"), error
    assert policy_of(alice, url) is None


def test_a_star_grant_covers_the_messages_but_never_the_owners_actions(
        srv: Server, keys: dict[str, dict[str, str]], alice: Any, bob: Any) -> None:
    name = fresh("star")
    url = alice.create_queue(QueueName=name, tags={"team": "a"},
                             Attributes={"VisibilityTimeout": "30"})["QueueUrl"]
    alice.add_permission(QueueUrl=url, Label="everything", AWSAccountIds=[BOB], Actions=["*"])

    assert bob.get_queue_url(QueueName=name, QueueOwnerAWSAccountId=ALICE)["QueueUrl"] == url
    bob.send_message(QueueUrl=url, MessageBody="one")
    [message] = bob.receive_message(QueueUrl=url, WaitTimeSeconds=2)["Messages"]
    bob.change_message_visibility(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"],
                                  VisibilityTimeout=60)
    bob.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    attributes = bob.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert attributes["QueueArn"] == f"arn:aws:sqs:{REGION}:{ALICE}:{name}"

    # SQS: "Cross-account permissions don't apply to" these, whatever the policy grants.
    for method, kwargs in OWNER_ONLY_CALLS:
        assert_hidden(getattr(bob, method), name, QueueUrl=url, **kwargs)
    # Nor on the native API.
    b, owner = token(keys, BOB), f"?owner={ALICE}"
    for method, path, payload in (
            ("PATCH", "", {"attributes": {"visibility_timeout": 1}}),
            ("PATCH", "", {"rate_limit": "1/s"}),
            ("DELETE", "", None),
            ("PUT", "/permissions/takeover", {"accounts": [BOB], "actions": ["*"]}),
            ("DELETE", "/permissions/everything", None)):
        native_hidden(native(srv, method, f"/v1/queues/{name}{path}{owner}", payload,
                             token=b), name)
    reply = native(srv, "GET", f"/v1/queues/{name}{owner}", token=b)
    assert reply.status == 200 and reply.json()["name"] == name, reply
    # Nothing changed: the policy, the tags, the attributes, the queue itself.
    document = policy_of(alice, url)
    assert document is not None and [s["Sid"] for s in document["Statement"]] == ["everything"]
    assert alice.list_queue_tags(QueueUrl=url)["Tags"] == {"team": "a"}
    assert alice.get_queue_attributes(QueueUrl=url, AttributeNames=["VisibilityTimeout"])[
        "Attributes"]["VisibilityTimeout"] == "30"
    assert url in alice.list_queues(QueueNamePrefix=name)["QueueUrls"]


def test_a_policy_of_sqs_star_for_everyone_still_keeps_the_owners_actions(
        alice: Any, bob: Any, carol: Any) -> None:
    name = fresh("public")
    url = alice.create_queue(QueueName=name, Attributes={"Policy": policy(
        statement("public", "Allow", "*", "sqs:*"))})["QueueUrl"]
    for sqs in (bob, carol):
        sqs.send_message(QueueUrl=url, MessageBody="anyone may send")
        for method, kwargs in OWNER_ONLY_CALLS:
            assert_hidden(getattr(sqs, method), name, QueueUrl=url, **kwargs)
    assert int(alice.get_queue_attributes(QueueUrl=url, AttributeNames=[
        "ApproximateNumberOfMessages"])["Attributes"]["ApproximateNumberOfMessages"]) == 2


# --- the Policy attribute ----------------------------------------------------------------------


def test_an_explicit_deny_wins_over_an_allow(alice: Any, bob: Any, carol: Any) -> None:
    name = fresh("deny")
    url = alice.create_queue(QueueName=name, Attributes={"Policy": policy(
        statement("no-receive", "Deny", {"AWS": BOB}, "sqs:ReceiveMessage"),
        statement("all-for-bob", "Allow", {"AWS": [f"arn:aws:iam::{BOB}:user/worker"]},
                  "sqs:*"),
        statement("carol-send", "Allow", {"AWS": CAROL}, ["sqs:SendMessage"]),
    )})["QueueUrl"]
    bob.send_message(QueueUrl=url, MessageBody="bob")
    carol.send_message(QueueUrl=url, MessageBody="carol")
    assert_hidden(bob.receive_message, name, QueueUrl=url)
    assert_hidden(carol.receive_message, name, QueueUrl=url)
    # The owner's account is never refused by its own queue's policy (server/protection/authz.py).
    assert len(alice.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                     WaitTimeSeconds=2)["Messages"]) >= 1
    # A Deny for everyone stops even Bob's allowed send.
    alice.set_queue_attributes(QueueUrl=url, Attributes={"Policy": policy(
        statement("all-for-bob", "Allow", {"AWS": BOB}, "sqs:*"),
        statement("freeze", "Deny", "*", "sqs:Send*"))})
    eventually(lambda: not can_send(bob, url), "the Deny to take effect")
    bob.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
    # Clearing the policy withdraws every grant.
    alice.set_queue_attributes(QueueUrl=url, Attributes={"Policy": ""})
    eventually(lambda: "Code" in refusal(bob.get_queue_attributes, QueueUrl=url,
                                         AttributeNames=["QueueArn"]), "the policy cleared")


def test_a_policy_statement_grants_only_on_the_queues_it_names(alice: Any, bob: Any) -> None:
    name, other = fresh("resource"), fresh("resource-other")
    arn = f"arn:aws:sqs:{REGION}:{ALICE}"
    url = alice.create_queue(QueueName=name, Attributes={"Policy": policy(
        {**statement("for-other", "Allow", {"AWS": BOB}, "sqs:SendMessage"),
         "Resource": f"{arn}:{other}"})})["QueueUrl"]
    assert_hidden(bob.send_message, name, QueueUrl=url, MessageBody="not granted here")
    alice.set_queue_attributes(QueueUrl=url, Attributes={"Policy": policy(
        {**statement("by-prefix", "Allow", {"AWS": BOB}, "sqs:SendMessage"),
         "Resource": f"arn:aws:sqs:*:{ALICE}:resource-*"})})
    eventually(lambda: can_send(bob, url), "the matching Resource to grant")


@pytest.mark.parametrize("bad", [
    policy({**statement("c", "Allow", "*", "sqs:SendMessage"),
            "Condition": {"ArnEquals": {"aws:SourceArn": "arn:aws:sns:us-east-1:1:t"}}}),
    policy({"Sid": "n", "Effect": "Allow", "Principal": "*", "NotAction": "sqs:DeleteQueue"}),
    policy({"Sid": "n", "Effect": "Deny", "NotPrincipal": {"AWS": ALICE},
            "Action": "sqs:*"}),
    policy(statement("e", "Maybe", "*", "sqs:SendMessage")),
    policy(statement("p", "Allow", {"Service": "sns.amazonaws.com"}, "sqs:SendMessage")),
    policy(statement("p", "Allow", {"AWS": "bob"}, "sqs:SendMessage")),
    policy(statement("a", "Allow", "*", "s3:GetObject")),
    policy(statement("a", "Allow", "*", [])),
    policy(*[statement(f"s{i}", "Allow", "*", "sqs:SendMessage") for i in range(21)]),
    "not json", "[]", '"a string"', '{"Statement": "x"}', '{"Statement": [1]}',
])
def test_a_policy_that_cannot_be_enforced_exactly_is_refused(alice: Any, bob: Any,
                                                             bad: str) -> None:
    name = fresh("bad-policy")
    error = refusal(alice.create_queue, QueueName=name, Attributes={"Policy": bad})
    assert (error["status"], error["Code"]) == (400, "InvalidAttributeValue"), error
    assert_hidden(alice.get_queue_url, name, QueueName=name)  # nothing was created
    good = policy(statement("bob-send", "Allow", {"AWS": BOB}, "sqs:SendMessage"))
    url = alice.create_queue(QueueName=name, Attributes={"Policy": good})["QueueUrl"]
    error = refusal(alice.set_queue_attributes, QueueUrl=url, Attributes={"Policy": bad})
    assert (error["status"], error["Code"]) == (400, "InvalidAttributeValue"), error
    # The policy in force is still the one that was accepted.
    assert policy_of(alice, url) == json.loads(good)
    bob.send_message(QueueUrl=url, MessageBody="still allowed")


# --- SQS's policy quotas --------------------------------------------------------------------

# The documented limits (docs/API.md), SQS's own.
POLICY_BYTES_MAX, STATEMENTS_MAX, PRINCIPALS_MAX, ACTIONS_PER_STATEMENT_MAX = 8192, 20, 50, 7
OTHERS = [f"4{i:011d}" for i in range(PRINCIPALS_MAX + 1)]  # accounts that are not Bob


def padded(text_of: Callable[[str], str], size: int) -> str:
    """The policy ``text_of(pad)`` grown with a padding Sid to exactly ``size`` bytes."""
    text = text_of("")
    return text_of("x" * (size - len(text.encode())))


def sized_policy(size: int) -> str:
    return padded(lambda pad: json.dumps(
        {"Version": "2012-10-17",
         "Statement": [statement("bob" + pad, "Allow", {"AWS": BOB}, "sqs:SendMessage")]},
        separators=(",", ":")), size)


def with_statements(count: int) -> str:
    return policy(*[statement(f"s{i}", "Allow", {"AWS": BOB}, "sqs:SendMessage")
                    for i in range(count)])


def with_principals(count: int) -> str:
    return policy(statement("many", "Allow", {"AWS": [BOB, *OTHERS[:count - 1]]},
                            "sqs:SendMessage"))


def with_actions(count: int) -> str:
    actions = ["sqs:SendMessage"] + [f"sqs:Get{i}*" for i in range(count - 1)]
    return policy(statement("acts", "Allow", {"AWS": BOB}, actions))


QUOTAS = {
    "bytes": (sized_policy, POLICY_BYTES_MAX, f"at most {POLICY_BYTES_MAX} bytes"),
    "statements": (with_statements, STATEMENTS_MAX, f"at most {STATEMENTS_MAX}"),
    "principals": (with_principals, PRINCIPALS_MAX, f"at most {PRINCIPALS_MAX} principals"),
    "actions": (with_actions, ACTIONS_PER_STATEMENT_MAX,
                f"at most {ACTIONS_PER_STATEMENT_MAX} actions"),
}


@pytest.mark.parametrize("quota", list(QUOTAS))
def test_a_policy_within_sqs_quotas_is_taken_and_one_past_them_refused(
        alice: Any, bob: Any, quota: str) -> None:
    make, limit, reason = QUOTAS[quota]
    at_limit, past = make(limit), make(limit + 1)
    assert len(sized_policy(POLICY_BYTES_MAX).encode()) == POLICY_BYTES_MAX
    name = fresh(f"quota-{quota}")
    error = refusal(alice.create_queue, QueueName=name, Attributes={"Policy": past})
    assert (error["status"], error["Code"]) == (400, "InvalidAttributeValue"), error
    assert reason in error["Message"], error
    assert len(error["Message"]) < 300, "the refusal must not echo the policy back"
    assert_hidden(alice.get_queue_url, name, QueueName=name)  # nothing was created

    url = alice.create_queue(QueueName=name, Attributes={"Policy": at_limit})["QueueUrl"]
    bob.send_message(QueueUrl=url, MessageBody="granted by a policy at the limit")
    error = refusal(alice.set_queue_attributes, QueueUrl=url, Attributes={"Policy": past})
    assert (error["status"], error["Code"]) == (400, "InvalidAttributeValue"), error
    assert policy_of(alice, url) == json.loads(at_limit)  # unchanged


def test_the_reported_589_kb_policy_is_refused(alice: Any) -> None:
    # 100 statements of hundreds of distinct action patterns: 589 KB that every
    # cross-account request used to match pattern by pattern, for seconds.
    per = 589 * 1024 // 100 // 14
    huge = policy(*[statement(f"s{s}", "Allow", "*",
                              [f"sqs:Z{s}x{i}*" for i in range(per)] + ["sqs:Send*"])
                    for s in range(100)])
    assert len(huge) > 589 * 1024
    error = refusal(alice.create_queue, QueueName=fresh("huge"), Attributes={"Policy": huge})
    assert (error["status"], error["Code"]) == (400, "InvalidAttributeValue"), error


def test_add_permission_past_sqs_quotas_is_over_limit(alice: Any, bob: Any) -> None:
    url = alice.create_queue(QueueName=fresh("grants"))["QueueUrl"]
    for i in range(STATEMENTS_MAX):
        alice.add_permission(QueueUrl=url, Label=f"l{i}", AWSAccountIds=[BOB],
                             Actions=["SendMessage"])
    with pytest.raises(alice.exceptions.OverLimit) as over:  # what SQS answers
        alice.add_permission(QueueUrl=url, Label="one-more", AWSAccountIds=[BOB],
                             Actions=["SendMessage"])
    assert over.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert len(policy_of(alice, url)["Statement"]) == STATEMENTS_MAX  # unchanged

    url = alice.create_queue(QueueName=fresh("grants"))["QueueUrl"]
    with pytest.raises(alice.exceptions.OverLimit):
        alice.add_permission(QueueUrl=url, Label="crowd", AWSAccountIds=OTHERS,
                             Actions=["SendMessage"])
    assert policy_of(alice, url) is None
    bob_grant = alice.add_permission(QueueUrl=url, Label="bob", AWSAccountIds=[BOB],
                                     Actions=["SendMessage"])
    assert bob_grant["ResponseMetadata"]["HTTPStatusCode"] == 200
    bob.send_message(QueueUrl=url, MessageBody="granted")


def test_a_max_size_policy_is_evaluated_in_microseconds(alice: Any, bob: Any) -> None:
    # Every statement applies to everyone and its Action and Resource match only at their
    # last pattern, so matching pattern by pattern on each request does the most work.
    def text_of(resources: int) -> str:
        return policy(*[{
            "Sid": f"s{s}", "Effect": "Allow", "Principal": "*",
            "Action": [f"sqs:Zz{i}*" for i in range(6)] + ["sqs:Send*"],
            "Resource": [f"arn:aws:sqs:*:*:n{s}x{k}*" for k in range(resources)]
            + [f"arn:aws:sqs:*:{ALICE}:max*"]} for s in range(STATEMENTS_MAX)])
    resources = 0
    while len(text_of(resources + 1)) <= POLICY_BYTES_MAX:
        resources += 1
    text = text_of(resources)
    name = fresh("max-policy")
    compiled = authz.compile_policy(text, ALICE, name)
    assert compiled is not None
    # The best of several runs: a busy machine only ever adds time, so one run it left
    # alone is enough, and the bound does not depend on the others.
    rounds, runs = 400, 5
    best = math.inf
    for _ in range(runs):
        started = time.perf_counter()
        for _ in range(rounds):
            authz.check(ALICE, name, BOB, "SendMessage", compiled)
        best = min(best, time.perf_counter() - started)
    per_check_us = best / rounds * 1e6
    print(f"{len(text)} bytes, {STATEMENTS_MAX * (resources + 1)} resources: "
          f"{per_check_us:.2f} us a check")
    assert per_check_us < 50  # matching each pattern each time took 200-300 us

    url = alice.create_queue(QueueName=name, Attributes={"Policy": text})["QueueUrl"]
    bob.send_message(QueueUrl=url, MessageBody="through a max-size policy")
    assert_hidden(bob.receive_message, name, QueueUrl=url)


def test_policy_limits_are_the_documented_ones() -> None:
    assert (authz.POLICY_BYTES_MAX, authz.STATEMENTS_MAX, authz.PRINCIPALS_MAX,
            authz.ACTIONS_PER_STATEMENT_MAX) == (POLICY_BYTES_MAX, STATEMENTS_MAX,
                                                 PRINCIPALS_MAX, ACTIONS_PER_STATEMENT_MAX)


@pytest.mark.parametrize(("pattern", "text", "matched"), [
    ("*", "anything", True), ("orders", "orders", True), ("orders", "orders2", False),
    ("ord*", "orders", True), ("ord*", "or", False), ("o?ders", "orders", True),
    ("*ders", "orders", True), ("o*d*s", "orders", True), ("o*x*s", "orders", False),
    ("[o]rders", "orders", False), ("[o]rders", "[o]rders", True),  # IAM: [ is literal
    ("*a" * 2000 + "b", "a" * 80, False),  # many stars: no runaway backtracking
])
def test_policy_wildcards(pattern: str, text: str, matched: bool) -> None:
    started = time.perf_counter()
    assert authz.compile_policy(policy({
        "Effect": "Allow", "Principal": "*", "Action": "sqs:SendMessage",
        "Resource": f"arn:aws:sqs:*:{ALICE}:{pattern}"}), ALICE, text) is not None
    assert authz.allowed(ALICE, text, BOB, "SendMessage", policy({
        "Effect": "Allow", "Principal": "*", "Action": "sqs:SendMessage",
        "Resource": f"arn:aws:sqs:*:{ALICE}:{pattern}"})) is matched
    assert time.perf_counter() - started < 1


def test_a_stored_policy_past_the_limits_still_grants_and_can_shrink() -> None:
    # Kept before the limits applied: evaluated as kept, and a grant can be removed.
    stored = with_statements(STATEMENTS_MAX + 5)
    assert authz.allowed(ALICE, "q", BOB, "SendMessage", stored)
    smaller = authz.remove_permission(stored, "s0")
    assert len(json.loads(smaller)["Statement"]) == STATEMENTS_MAX + 4
    with pytest.raises(OverLimitError):
        authz.add_permission(stored, REGION, ALICE, "q", "more", [BOB], ["SendMessage"])
    # One that no longer parses grants nothing, rather than failing every request.
    assert authz.compile_policy("[" * 100 + "]" * 100, ALICE, "q") is not None
    assert not authz.allowed(ALICE, "q", BOB, "SendMessage", "[" * 100 + "]" * 100)


# --- the native API ------------------------------------------------------------------------------


def native_hidden(reply: Reply, name: str) -> None:
    assert (reply.status, reply.json()) == (404, {"error": {
        "code": "QueueNotFound", "message": f"queue {name!r} does not exist"}}), reply


def test_native_permissions_and_the_owner_parameter(srv: Server,
                                                    keys: dict[str, dict[str, str]],
                                                    bob: Any) -> None:
    a, b = token(keys, ALICE), token(keys, BOB)
    name, absent = fresh("native-shared"), fresh("native-absent")
    assert native(srv, "POST", "/v1/queues", {"name": name}, token=a).status == 201
    owner = f"?owner={ALICE}"

    # Without a grant, Bob cannot tell Alice's queue from no queue.
    for queue in (name, absent):
        for method, path, payload in (
                ("GET", "", None), ("POST", "/messages/receive", {}),
                ("GET", "/permissions", None), ("DELETE", "", None), ("POST", "/purge", None),
                ("PATCH", "", {"attributes": {"visibility_timeout": 1}}),
                ("PUT", "/permissions/x", {"accounts": [BOB], "actions": ["SendMessage"]})):
            reply = native(srv, method, f"/v1/queues/{queue}{path}{owner}", payload, token=b)
            native_hidden(reply, queue)
        native_hidden(native(srv, "POST", f"/v1/queues/{queue}/messages{owner}", raw=b"x",
                             token=b), queue)

    grant = {"accounts": [BOB], "actions": ["SendMessage"]}
    reply = native(srv, "PUT", f"/v1/queues/{name}/permissions/bob-send", grant, token=a)
    assert reply.status == 204, reply
    reply = native(srv, "GET", f"/v1/queues/{name}/permissions", token=a)
    assert reply.status == 200, reply
    [granted] = reply.json()["permissions"]
    assert (granted["Sid"], granted["Effect"], granted["Action"]) == (
        "bob-send", "Allow", "SQS:SendMessage")
    reply = native(srv, "PUT", f"/v1/queues/{name}/permissions/bob-send", grant, token=a)
    assert reply.status == 400 and reply.json()["error"]["code"] == "InvalidParameter"

    reply = native(srv, "POST", f"/v1/queues/{name}/messages{owner}", raw=b"native from bob",
                   token=b)
    assert reply.status == 201, reply
    # The grant is honoured on the SQS protocol too: it is one policy.
    bob.send_message(QueueUrl=f"{srv.url}/{ALICE}/{name}", MessageBody="sqs from bob")
    native_hidden(native(srv, "POST", f"/v1/queues/{name}/messages/receive{owner}", {},
                         token=b), name)
    native_hidden(native(srv, "GET", f"/v1/queues/{name}/permissions{owner}", token=b), name)
    native_hidden(native(srv, "DELETE", f"/v1/queues/{name}/permissions/bob-send{owner}",
                         token=b), name)
    reply = native(srv, "POST", f"/v1/queues/{name}/messages/receive",
                   {"max_messages": 10, "wait_seconds": 2}, token=a)
    assert sorted(m["body"] for m in reply.json()["messages"]) == [
        "native from bob", "sqs from bob"]

    reply = native(srv, "DELETE", f"/v1/queues/{name}/permissions/bob-send", token=a)
    assert reply.status == 204, reply

    def bob_refused() -> bool:
        sent = native(srv, "POST", f"/v1/queues/{name}/messages{owner}", raw=b"x", token=b)
        return sent.status == 404
    eventually(bob_refused, "Bob refused after the native DELETE")
    reply = native(srv, "DELETE", f"/v1/queues/{name}/permissions/bob-send", token=a)
    assert reply.status == 400 and reply.json()["error"]["code"] == "InvalidParameter"
    assert native(srv, "GET", f"/v1/queues/{name}/permissions", token=a).json() == {
        "permissions": []}


@pytest.mark.parametrize("body", [
    {"accounts": BOB, "actions": ["SendMessage"]},
    {"accounts": [BOB], "actions": "SendMessage"},
    {"accounts": [BOB]},
    {"accounts": [BOB, 222222222222], "actions": ["SendMessage"]},
    {"accounts": [BOB], "actions": ["DeleteQueue"]},
    {"accounts": ["bob"], "actions": ["SendMessage"]},
])
def test_native_put_permission_refuses_bad_bodies(srv: Server, keys: dict[str, dict[str, str]],
                                                  body: dict[str, Any]) -> None:
    a = token(keys, ALICE)
    assert native(srv, "POST", "/v1/queues", {"name": "native-bad"}, token=a).status in (200,
                                                                                        201)
    reply = native(srv, "PUT", "/v1/queues/native-bad/permissions/label", body, token=a)
    assert reply.status == 400, reply
    assert native(srv, "GET", "/v1/queues/native-bad/permissions", token=a).json() == {
        "permissions": []}


def test_the_owner_parameter_must_be_an_account_and_never_widens_a_list_or_a_create(
        srv: Server, keys: dict[str, dict[str, str]], alice: Any) -> None:
    a, b = token(keys, ALICE), token(keys, BOB)
    for bad in ("abc", "1111", "1111111111111", "%20111111111111", quote("\uff11" * 12), ""):
        reply = native(srv, "GET", f"/v1/queues/anything?owner={bad}", token=b)
        assert (reply.status, reply.json()["error"]["code"]) == (400, "InvalidParameter"), bad
    name = fresh("alices-list")
    assert native(srv, "POST", "/v1/queues", {"name": name}, token=a).status == 201
    listed = native(srv, "GET", f"/v1/queues?owner={ALICE}", token=b)
    assert listed.status == 200 and name not in listed.body.decode()
    # A create names the caller's own account, whatever ?owner= says.
    created = native(srv, "POST", f"/v1/queues?owner={ALICE}", {"name": fresh("bobs")}, token=b)
    assert created.status == 201, created
    assert not any(created.json()["name"] in u
                   for u in alice.list_queues().get("QueueUrls", []))


# --- server/protection/authz.py in process ------------------------------------------------


def test_the_owner_may_do_anything_whatever_the_policy() -> None:
    deny_all = policy(statement("d", "Deny", "*", "*"))
    for action in ("SendMessage", "DeleteQueue", "SetQueueAttributes", "AddPermission"):
        assert authz.allowed(ALICE, "q", ALICE, action, deny_all)
        assert authz.allowed(ALICE, "q", ALICE, action, None)


def test_no_policy_grants_nothing() -> None:
    for policy_text in (None, "", policy()):
        assert not authz.allowed(ALICE, "q", BOB, "SendMessage", policy_text)


@pytest.mark.parametrize("principal", [
    "*", {"AWS": "*"}, {"AWS": BOB}, {"AWS": [CAROL, BOB]},
    {"AWS": f"arn:aws:iam::{BOB}:root"}, {"AWS": f"arn:aws:iam::{BOB}:user/path/worker"},
])
def test_principals_that_name_the_caller(principal: Any) -> None:
    text = policy(statement("s", "Allow", principal, "sqs:SendMessage"))
    assert authz.allowed(ALICE, "q", BOB, "SendMessage", text)
    assert not authz.allowed(ALICE, "q", BOB, "ReceiveMessage", text)


@pytest.mark.parametrize("principal", [{"AWS": CAROL}, {"AWS": f"arn:aws:iam::{CAROL}:root"},
                                       {"AWS": [CAROL, ALICE]}])
def test_principals_that_do_not_name_the_caller(principal: Any) -> None:
    text = policy(statement("s", "Allow", principal, "sqs:*"))
    assert not authz.allowed(ALICE, "q", BOB, "SendMessage", text)


@pytest.mark.parametrize(("pattern", "granted", "refused"), [
    ("sqs:SendMessage", ["SendMessage", "SendMessageBatch"], ["ReceiveMessage"]),
    ("SQS:SENDMESSAGE", ["SendMessage", "SendMessageBatch"], ["ReceiveMessage"]),
    ("sqs:Send*", ["SendMessage", "SendMessageBatch"], ["DeleteMessage"]),
    ("sqs:*Message", ["SendMessage", "ReceiveMessage", "DeleteMessage",
                      "DeleteMessageBatch"], ["GetQueueAttributes", "PurgeQueue"]),
    ("sqs:ChangeMessageVisibility", ["ChangeMessageVisibilityBatch"], ["DeleteMessage"]),
    ("sqs:Get*", ["GetQueueAttributes", "GetQueueUrl"], ["SendMessage"]),
    ("sqs:*", ["SendMessage", "PurgeQueue", "ListDeadLetterSourceQueues"], []),
    ("*", ["ReceiveMessage", "GetQueueUrl"], []),
    ("sqs:DeleteMessage", ["DeleteMessage", "DeleteMessageBatch"], ["DeleteQueue"]),
])
def test_action_patterns(pattern: str, granted: list[str], refused: list[str]) -> None:
    text = policy(statement("s", "Allow", {"AWS": BOB}, pattern))
    for action in granted:
        assert authz.allowed(ALICE, "q", BOB, action, text), (pattern, action)
    for action in refused:
        assert not authz.allowed(ALICE, "q", BOB, action, text), (pattern, action)


@pytest.mark.parametrize("action", sorted({
    "AddPermission", "RemovePermission", "SetQueueAttributes", "DeleteQueue", "TagQueue",
    "UntagQueue", "ListQueueTags", "CreateQueue", "ListQueues", "StartMessageMoveTask",
    "CancelMessageMoveTask", "ListMessageMoveTasks"}))
def test_the_owners_actions_are_never_granted_to_another_account(action: str) -> None:
    for pattern in ("*", "sqs:*", f"sqs:{action}"):
        text = policy(statement("s", "Allow", "*", pattern))
        assert not authz.allowed(ALICE, "q", BOB, action, text), (pattern, action)
    granted = authz.add_permission(None, REGION, ALICE, "q", "all", [BOB], ["*"])
    assert not authz.allowed(ALICE, "q", BOB, action, granted)
    assert authz.allowed(ALICE, "q", ALICE, action, granted)


def test_deny_wins_whatever_the_order() -> None:
    allow = statement("a", "Allow", "*", "sqs:*")
    deny = statement("d", "Deny", {"AWS": BOB}, "sqs:ReceiveMessage")
    for text in (policy(allow, deny), policy(deny, allow)):
        assert not authz.allowed(ALICE, "q", BOB, "ReceiveMessage", text)
        assert authz.allowed(ALICE, "q", BOB, "SendMessage", text)
        assert authz.allowed(ALICE, "q", CAROL, "ReceiveMessage", text)
    deny_batch = statement("d", "Deny", "*", "sqs:SendMessage")
    assert not authz.allowed(ALICE, "q", BOB, "SendMessageBatch", policy(allow, deny_batch))


@pytest.mark.parametrize(("resource", "applies"), [
    ("*", True), (None, True),
    (f"arn:aws:sqs:{REGION}:{ALICE}:q", True),
    (f"arn:aws:sqs:*:{ALICE}:q", True),
    ("arn:aws:sqs:*:*:*", True),
    (f"arn:aws:sqs:{REGION}:{ALICE}:*", True),
    (f"arn:aws:sqs:{REGION}:{ALICE}:?", True),
    ([f"arn:aws:sqs:{REGION}:{ALICE}:other", f"arn:aws:sqs:{REGION}:{ALICE}:q"], True),
    (f"arn:aws:sqs:{REGION}:{ALICE}:other", False),
    (f"arn:aws:sqs:{REGION}:{ALICE}:Q", False),
    (f"arn:aws:sqs:{REGION}:{ALICE}:q*x", False),
    (f"arn:aws:sqs:{REGION}:{CAROL}:q", False),
    (f"arn:aws:sqs:{REGION}:{CAROL}:*", False),
])
def test_a_statement_applies_to_the_queues_its_resource_names(resource: Any,
                                                               applies: bool) -> None:
    allow = {"Effect": "Allow", "Principal": {"AWS": BOB}, "Action": "sqs:SendMessage"}
    if resource is not None:
        allow["Resource"] = resource
    assert authz.allowed(ALICE, "q", BOB, "SendMessage", policy(allow)) is applies
    # A Deny, too, binds only the queues it names.
    deny = {**allow, "Effect": "Deny"}
    both = policy(statement("all", "Allow", {"AWS": BOB}, "sqs:*"), deny)
    assert authz.allowed(ALICE, "q", BOB, "SendMessage", both) is not applies


def test_a_single_statement_object_is_a_list_of_one() -> None:
    text = json.dumps({"Statement": statement("s", "Allow", {"AWS": BOB}, "sqs:SendMessage")})
    assert authz.parse(text)["Statement"][0]["Sid"] == "s"
    assert authz.allowed(ALICE, "q", BOB, "SendMessage", text)


@pytest.mark.parametrize(("text", "reason"), [
    ("{", "JSON object"), ("[]", "JSON object"), ("null", "JSON object"),
    ('{"Statement": 5}', "Statement must be a list"),
    (policy(*[statement(f"s{i}", "Allow", "*", "*") for i in range(authz.STATEMENTS_MAX + 1)]),
     "Statement must be a list"),
    ('{"Statement": ["s"]}', "must be an object"),
    (policy({**statement("s", "Allow", "*", "*"), "Condition": {}}), "Condition"),
    (policy({**statement("s", "Allow", "*", "*"), "NotResource": "x"}), "NotResource"),
    (policy({"Effect": "Allow", "Principal": "*", "NotAction": "sqs:x"}), "NotAction"),
    (policy({"Effect": "Deny", "NotPrincipal": {"AWS": BOB}, "Action": "*"}), "NotPrincipal"),
    (policy(statement("s", "allow", "*", "*")), "Effect"),
    (policy({"Principal": "*", "Action": "*"}), "Effect"),
    (policy(statement("s", "Allow", None, "*")), "Principal"),
    (policy(statement("s", "Allow", {"AWS": BOB, "Service": "x"}, "*")), "Principal"),
    (policy(statement("s", "Allow", {"AWS": []}, "*")), "string or a list"),
    (policy(statement("s", "Allow", {"AWS": "arn:aws:iam::12:root"}, "*")), "account id"),
    (policy(statement("s", "Allow", {"AWS": BOB + " "}, "*")), "account id"),
    (policy(statement("s", "Allow", "*", "sns:Publish")), "not an SQS action"),
    (policy(statement("s", "Allow", "*", ["sqs:SendMessage", 5])), "string or a list"),
    (policy(statement("s", "Allow", "*", None)), "string or a list"),
    (policy({**statement("s", "Allow", "*", "*"), "Resource": "arn:aws:s3:::bucket"}),
     "not \\* or an SQS queue ARN"),
    (policy({**statement("s", "Allow", "*", "*"), "Resource": "arn:aws:sqs:us-east-1:q"}),
     "SQS queue ARN"),
    (policy({**statement("s", "Allow", "*", "*"), "Resource": []}), "string or a list"),
    (policy({**statement("s", "Allow", "*", "*"), "Resource": 5}), "string or a list"),
])
def test_parse_refuses_what_cannot_be_evaluated_exactly(text: str, reason: str) -> None:
    with pytest.raises(InvalidAttributeError, match=reason):
        authz.parse(text)


def test_add_permission_writes_what_sqs_writes() -> None:
    text = authz.add_permission(None, REGION, ALICE, "orders", "two", [BOB, CAROL],
                                ["SendMessage", "ReceiveMessage"])
    document = json.loads(text)
    assert document["Version"] == "2012-10-17"
    assert document["Id"] == f"arn:aws:sqs:{REGION}:{ALICE}:orders/SQSDefaultPolicy"
    assert document["Statement"] == [{
        "Sid": "two", "Effect": "Allow",
        "Principal": {"AWS": [f"arn:aws:iam::{BOB}:root", f"arn:aws:iam::{CAROL}:root"]},
        "Action": ["SQS:SendMessage", "SQS:ReceiveMessage"],
        "Resource": f"arn:aws:sqs:{REGION}:{ALICE}:orders"}]
    more = authz.add_permission(text, REGION, ALICE, "orders", "three", [BOB], ["*"])
    assert [s["Sid"] for s in json.loads(more)["Statement"]] == ["two", "three"]
    assert json.loads(more)["Statement"][1]["Action"] == "SQS:*"
    back = authz.remove_permission(more, "three")
    assert json.loads(back)["Statement"] == document["Statement"]
    assert authz.remove_permission(back, "two") == ""


@pytest.mark.parametrize(("label", "accounts", "actions", "field"), [
    ("", [BOB], ["SendMessage"], "Label"),
    ("a/b", [BOB], ["SendMessage"], "Label"),
    ("x" * (authz.LABEL_CHARS_MAX + 1), [BOB], ["SendMessage"], "Label"),
    ("ok", [], ["SendMessage"], "AWSAccountIds"),
    ("ok", ["22222222222"], ["SendMessage"], "AWSAccountIds"),
    ("ok", [222222222222], ["SendMessage"], "AWSAccountIds"),
    ("ok", [BOB], [], "Actions"),
    ("ok", [BOB], ["PurgeQueue"], "Actions"),
    ("ok", [BOB], ["sendmessage"], "Actions"),
])
def test_add_permission_refusals(label: str, accounts: list[Any], actions: list[str],
                                 field: str) -> None:
    with pytest.raises(InvalidParameterError, match=field):
        authz.add_permission(None, REGION, ALICE, "q", label, accounts, actions)


def test_labels_are_unique_and_statements_bounded() -> None:
    text = authz.add_permission(None, REGION, ALICE, "q", "l0", [BOB], ["SendMessage"])
    with pytest.raises(InvalidParameterError, match="already exists"):
        authz.add_permission(text, REGION, ALICE, "q", "l0", [CAROL], ["SendMessage"])
    for i in range(1, authz.STATEMENTS_MAX):
        text = authz.add_permission(text, REGION, ALICE, "q", f"l{i}", [BOB], ["SendMessage"])
    assert len(json.loads(text)["Statement"]) == authz.STATEMENTS_MAX
    with pytest.raises(OverLimitError, match=f"at most {authz.STATEMENTS_MAX} statements"):
        authz.add_permission(text, REGION, ALICE, "q", "one-more", [BOB], ["SendMessage"])
    with pytest.raises(InvalidParameterError, match="no permission has this label"):
        authz.remove_permission(text, "absent")
    with pytest.raises(InvalidParameterError, match="no permission has this label"):
        authz.remove_permission(None, "absent")


def test_a_refusal_is_the_error_of_a_missing_queue() -> None:
    with pytest.raises(QueueNotFoundError) as caught:
        authz.check(ALICE, "orders", BOB, "SendMessage", None)
    assert str(caught.value) == str(QueueNotFoundError("orders"))
    authz.check(ALICE, "orders", ALICE, "SendMessage", None)  # the owner: no error
