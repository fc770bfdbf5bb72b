"""Type stubs for engine._queue (see _queue.pyx for the behaviour)."""

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from engine.errors import EngineError
from engine.records import MessageAttribute, Origin, Record
from engine.results import Message, SendEntry, SendResult

CATEGORIES: dict[str, int]
DEDUP_WINDOW_MS: int
FORMAT_CONSTANTS: dict[str, int]
RECEIPT_HANDLE_CHARS: int

def handle_queue_uid(handle: object) -> int | None: ...

def message_id_of(queue_uid: int, seq: int, explicit: bytes | None = None) -> str: ...
def message_id_bytes(queue_uid: int, seq: int) -> bytes: ...
def sequence_number_of(seq: int) -> str: ...
def make_handle(mac: Callable[[bytes], bytes], queue_uid: int, seq: int, lease: int) -> str: ...
def encode_send(
    seq: int,
    sent_at: int,
    visible_at: int,
    body: bytes,
    group: str | None = None,
    dedup: str | None = None,
    message_id: bytes | None = None,
    origin: Origin | None = None,
    attributes: Mapping[str, MessageAttribute] | None = None,
    sender: str | None = None,
    system_attributes: Mapping[str, MessageAttribute] | None = None,
) -> bytes: ...
def encode_messages(state: State) -> bytes: ...
def restore_messages(state: State, data: bytes, pos: int, count: int) -> int: ...
def messages_floor(data: bytes, pos: int, count: int, floor: int) -> tuple[int, int]: ...

class Msg:
    seq: int
    location: int
    sent_at: int
    visible_at: int
    lease: int
    leased_at: int
    first_received_at: int
    receive_count: int
    category: int
    group: str | None
    dedup: str | None
    message_id: bytes | None
    origin: Origin | None

class ReceiptOpener:
    def __init__(self, mac: Callable[[bytes], bytes], queue_uid: int) -> None: ...
    def open(self, handle: object) -> tuple[int, int]: ...

class State:
    fifo: bool
    messages: dict[int, Msg]
    next_seq: int
    last_time: int
    config: dict[str, Any]
    dedup: dict[str, tuple[int, int]]
    origins: dict[tuple[int, int], int]
    def __init__(self, fifo: bool) -> None: ...
    @property
    def counters(self) -> dict[str, int]: ...
    def set_counters(self, counters: dict[str, int]) -> None: ...
    @property
    def category_counts(self) -> list[int]: ...
    def apply(self, offset: int, record: Record) -> None: ...
    def apply_send(
        self,
        offset: int,
        seq: int,
        sent_at: int,
        visible_at: int,
        group: str | None,
        dedup: str | None,
        message_id: bytes | None,
        origin: Origin | None,
    ) -> None: ...
    def apply_lease(self, offset: int, now: int, until: int, seqs: Iterable[int]) -> None: ...
    def apply_seqs(self, offset: int, tag: int, now: int, seqs: Iterable[int]) -> None: ...
    def apply_deletes(self, now: int, pairs: Iterable[tuple[int, int]]) -> None: ...
    def restore_dedup(self, key: str, seq: int, sent_at: int,
                      message_id: bytes | None = None) -> None: ...
    def advance(self, now: int) -> None: ...
    def take(self, now: int, limit: int) -> list[Msg]: ...
    def takeable(self, now: int) -> bool: ...
    def next_timer(self) -> int | None: ...
    def duplicate_of(self, key: str, now: int) -> tuple[int, int, bytes | None] | None: ...
    def oldest_sent_at(self) -> int | None: ...
    def oldest_location(self) -> int | None: ...
    def dedup_entries(self) -> list[tuple[str, tuple[int, int, bytes | None]]]: ...
    def lead_send(
        self,
        log: Any,
        uid: int,
        now: int,
        entries: Sequence[SendEntry],
        max_bytes: int,
        delay_ms: int,
        check_entry: Callable[[SendEntry], tuple[Any, ...]],
    ) -> tuple[list[SendResult | EngineError], int]: ...
    def lead_receive(
        self,
        log: Any,
        uid: int,
        now: int,
        limit: int,
        visibility_ms: int,
        max_receive_count: int,
        mac: Callable[[bytes], bytes],
    ) -> tuple[list[Message], list[Msg], int]: ...
    def lead_delete(
        self, log: Any, opener: ReceiptOpener, now: int, handles: list[str]
    ) -> tuple[list[EngineError | None], int]: ...

