"""Server-side encryption: envelopes, tampering, nonces, key rotation, crashes, the master key.

Real keyring files in tmp_path and real AES-GCM throughout; a crash is a child process
killed by SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from engine.errors import ConfigError
from server.protection import masterkey, sse
from server.protection.sse import ENVELOPE_OVERHEAD, Keyring, SealError, is_sealed, key_id_of
from tests.support.databases import forge_checks

Q = "000000000000/orders"
Q2 = "000000000000/invoices"
MARKER = b"PLAINTEXT-MARKER-7f3a9c-never-on-disk"
ROOT = Path(__file__).resolve().parents[3]


def mid() -> bytes:
    return os.urandom(16)


@pytest.fixture
def master() -> bytes:
    return os.urandom(32)


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "keyring.sqlite3")


@pytest.fixture
def ring(path: str, master: bytes) -> Iterator[Keyring]:
    keyring = Keyring(path, master)
    yield keyring
    keyring.close()


def rows(path: str) -> list[tuple[int, str, bytes, int, int, int]]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT key_id, queue_id, wrapped, created_ms, uses_reserved, "
                          "retired FROM data_keys ORDER BY key_id").fetchall()


def reserved(path: str, key_id: int) -> int:
    return next(r[4] for r in rows(path) if r[0] == key_id)


# --- envelopes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 100, 256 * 1024])
def test_round_trip(ring: Keyring, size: int) -> None:
    body = os.urandom(size)
    message_id = mid()
    envelope = ring.seal(Q, message_id, body)
    assert len(envelope) == size + ENVELOPE_OVERHEAD
    assert is_sealed(envelope)
    assert ring.open(Q, message_id, envelope) == body


def test_overhead_and_layout(ring: Keyring) -> None:
    assert ENVELOPE_OVERHEAD == 37
    envelope = ring.seal(Q, mid(), b"x")
    assert envelope[:4] == b"\x00CVE"
    assert envelope[4] == 1
    assert key_id_of(envelope) == int.from_bytes(envelope[5:9], "big") == ring.key_ids(Q)[0]


@pytest.mark.parametrize("body", [b"", b"hello", b"CVE", b"\x00CV", b" \x00CVE",
                                  b"{\"order\": 1}", "é€😀".encode()])
def test_ordinary_bodies_are_not_sealed(body: bytes) -> None:
    assert not is_sealed(body)


def test_same_plaintext_seals_differently(ring: Keyring) -> None:
    message_id = mid()
    assert ring.seal(Q, message_id, b"same") != ring.seal(Q, message_id, b"same")


def test_plaintext_is_neither_in_envelope_nor_on_disk(tmp_path: Path, path: str,
                                                      master: bytes) -> None:
    ring = Keyring(path, master)
    body = b"prefix " + MARKER + b" suffix" * 10
    envelopes = [ring.seal(Q, mid(), body) for _ in range(100)]
    ring.rotate(Q)
    envelopes.append(ring.seal(Q, mid(), body))
    for envelope in envelopes:
        assert MARKER not in envelope
        assert MARKER[:12] not in envelope
    ring.close()
    files = list(tmp_path.iterdir())
    assert files
    for file in files:
        assert MARKER not in file.read_bytes()


# --- tampering ---------------------------------------------------------------------------------


def test_every_single_byte_change_is_refused(ring: Keyring) -> None:
    message_id = mid()
    envelope = ring.seal(Q, message_id, b"0123456789")
    for position in range(len(envelope)):
        for mask in (0x01, 0x80, 0xFF):
            altered = bytearray(envelope)
            altered[position] ^= mask
            with pytest.raises(SealError):
                ring.open(Q, message_id, bytes(altered))
    assert ring.open(Q, message_id, envelope) == b"0123456789"


def test_truncation_and_extension_are_refused(ring: Keyring) -> None:
    message_id = mid()
    envelope = ring.seal(Q, message_id, b"a body of some length")
    for length in range(len(envelope)):
        with pytest.raises(SealError):
            ring.open(Q, message_id, envelope[:length])
    with pytest.raises(SealError):
        ring.open(Q, message_id, envelope + b"\x00")
    with pytest.raises(SealError):
        ring.open(Q, message_id, envelope[:9] + envelope[10:])  # one nonce byte dropped


def test_wrong_queue_or_message_is_refused(ring: Keyring) -> None:
    message_id = mid()
    envelope = ring.seal(Q, message_id, b"body")
    ring.seal(Q2, mid(), b"so that Q2 has a key of its own")
    with pytest.raises(SealError):
        ring.open(Q2, message_id, envelope)
    with pytest.raises(SealError):
        ring.open(Q, mid(), envelope)
    with pytest.raises(SealError):
        ring.open(Q, message_id[:15], envelope)
    with pytest.raises(SealError):
        ring.open(Q + "x", message_id, envelope)


def test_unknown_key_id_is_refused(ring: Keyring) -> None:
    message_id = mid()
    envelope = ring.seal(Q, message_id, b"body")
    forged = envelope[:5] + (999).to_bytes(4, "big") + envelope[9:]
    with pytest.raises(SealError, match="999"):
        ring.open(Q, message_id, forged)


def test_unknown_version_and_non_envelope_are_refused(ring: Keyring) -> None:
    message_id = mid()
    envelope = ring.seal(Q, message_id, b"body")
    with pytest.raises(SealError, match="version"):
        ring.open(Q, message_id, envelope[:4] + b"\x02" + envelope[5:])
    with pytest.raises(SealError):
        ring.open(Q, message_id, b"an ordinary body that is long enough to be one")
    with pytest.raises(SealError):
        key_id_of(b"short")


def test_seal_requires_a_16_byte_message_id(ring: Keyring) -> None:
    with pytest.raises(ValueError, match="message_id"):
        ring.seal(Q, b"short", b"body")


# --- nonces ------------------------------------------------------------------------------------


def test_a_million_seals_never_repeat_a_nonce(ring: Keyring) -> None:
    message_id = mid()
    seal = ring.seal
    nonces = set()
    key_ids = set()
    for _ in range(1_000_000):
        envelope = seal(Q, message_id, b"m")
        nonces.add(envelope[9:21])
        key_ids.add(envelope[5:9])
    assert len(nonces) == 1_000_000
    assert len(key_ids) == 1  # one key: far below the bound that would rotate it


# --- rotation ----------------------------------------------------------------------------------


def test_rotate_uses_a_new_key_and_old_envelopes_still_open(path: str, master: bytes) -> None:
    ring = Keyring(path, master)
    old_id = mid()
    old = ring.seal(Q, old_id, b"old")
    first_key = key_id_of(old)
    new_key = ring.rotate(Q)
    assert new_key != first_key
    new_id = mid()
    new = ring.seal(Q, new_id, b"new")
    assert key_id_of(new) == new_key
    assert ring.open(Q, old_id, old) == b"old"
    assert ring.open(Q, new_id, new) == b"new"
    assert ring.key_ids(Q) == [first_key, new_key]
    assert [r[5] for r in rows(path)] == [1, 0]  # retired, active
    ring.close()

    # A new process: nothing cached, every key read back from the file.
    again = Keyring(path, master)
    assert again.open(Q, old_id, old) == b"old"
    assert again.open(Q, new_id, new) == b"new"
    assert key_id_of(again.seal(Q, mid(), b"later")) == new_key
    assert again.key_ids(Q) == [first_key, new_key]
    again.close()


def test_key_ids_are_global_and_found_from_any_queue(path: str, master: bytes) -> None:
    ring = Keyring(path, master)
    a, b = mid(), mid()
    ea = ring.seal(Q, a, b"a")
    eb = ring.seal(Q2, b, b"b")
    assert key_id_of(ea) != key_id_of(eb)
    assert ring.key_ids(Q) == [key_id_of(ea)]
    assert ring.key_ids(Q2) == [key_id_of(eb)]
    ring.close()
    again = Keyring(path, master)
    assert again.open(Q2, b, eb) == b"b"  # the key is found by its id alone
    assert again.open(Q, a, ea) == b"a"
    again.close()


def test_rotation_by_age(path: str, master: bytes) -> None:
    now = [1_000_000.0]
    ring = Keyring(path, master, rotate_period_s=3600, clock=lambda: now[0])
    first_id = mid()
    first = ring.seal(Q, first_id, b"first")
    now[0] += 3599
    assert key_id_of(ring.seal(Q, mid(), b"still young")) == key_id_of(first)
    now[0] += 2
    second = ring.seal(Q, mid(), b"after an hour")
    assert key_id_of(second) != key_id_of(first)
    assert ring.open(Q, first_id, first) == b"first"
    ring.close()

    # The age is kept on disk: a keyring opened later rotates a key that aged meanwhile.
    now[0] += 3601
    again = Keyring(path, master, rotate_period_s=3600, clock=lambda: now[0])
    third = again.seal(Q, mid(), b"later still")
    assert key_id_of(third) not in (key_id_of(first), key_id_of(second))
    assert again.open(Q, first_id, first) == b"first"
    again.close()


@pytest.mark.parametrize("period", [0, None])
def test_no_rotation_by_age_when_turned_off(path: str, master: bytes,
                                            period: float | None) -> None:
    now = [1_000_000.0]
    ring = Keyring(path, master, rotate_period_s=period, clock=lambda: now[0])
    first = key_id_of(ring.seal(Q, mid(), b"x"))
    now[0] += 100 * 365 * 86400
    assert key_id_of(ring.seal(Q, mid(), b"x")) == first
    ring.close()


def test_rotation_by_uses_never_exceeds_the_bound(path: str, master: bytes) -> None:
    ring = Keyring(path, master, rotate_after_uses=25, reserve_block=10)
    sealed = [(message_id, ring.seal(Q, message_id, b"%d" % i))
              for i, message_id in enumerate(mid() for _ in range(100))]
    uses = Counter(key_id_of(envelope) for _, envelope in sealed)
    assert list(uses.values()) == [25, 25, 25, 25]  # one process wastes nothing
    assert sorted(uses) == ring.key_ids(Q)
    assert all(r[4] <= 25 for r in rows(path))
    for i, (message_id, envelope) in enumerate(sealed):
        assert ring.open(Q, message_id, envelope) == b"%d" % i
    ring.close()


def test_uses_are_reserved_on_disk_before_they_are_spent(path: str, master: bytes) -> None:
    ring = Keyring(path, master, rotate_after_uses=1000, reserve_block=10)
    key = key_id_of(ring.seal(Q, mid(), b"x"))
    assert reserved(path, key) == 10
    for n in range(2, 31):
        ring.seal(Q, mid(), b"x")
        assert reserved(path, key) >= n  # never behind the uses
    assert reserved(path, key) == 30
    ring.seal(Q, mid(), b"x")
    assert reserved(path, key) == 40
    ring.close()


_CRASHING_CHILD = """
import os, signal, sys
from server.protection.sse import Keyring
path, master, out = sys.argv[1], bytes.fromhex(sys.argv[2]), sys.argv[3]
ring = Keyring(path, master, rotate_after_uses=25, reserve_block=10)
with open(out, "wb") as f:
    for _ in range(15):
        message_id = os.urandom(16)
        envelope = ring.seal("000000000000/orders", message_id, b"before the crash")
        f.write(len(envelope).to_bytes(4, "big") + message_id + envelope)
    f.flush()
    os.fsync(f.fileno())
os.kill(os.getpid(), signal.SIGKILL)  # no close(): the keyring is dropped mid-block
"""


def test_counting_resumes_at_the_reserved_count_after_a_crash(tmp_path: Path, path: str,
                                                              master: bytes) -> None:
    out = tmp_path / "envelopes.bin"
    child = subprocess.run([sys.executable, "-c", _CRASHING_CHILD, path, master.hex(),
                            str(out)], cwd=ROOT, capture_output=True, check=False)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    data = out.read_bytes()
    before = []
    while data:
        size = int.from_bytes(data[:4], "big")
        before.append((data[4:20], data[20:20 + size]))
        data = data[20 + size:]
    assert len(before) == 15
    key = key_id_of(before[0][1])
    assert reserved(path, key) == 20  # 15 used, 20 reserved when the process died

    ring = Keyring(path, master, rotate_after_uses=25, reserve_block=10)
    after = [ring.seal(Q, mid(), b"after the crash") for _ in range(20)]
    uses_after = Counter(key_id_of(envelope) for envelope in after)
    # The 5 uses between 15 and 20 are counted as spent: only 25 - 20 = 5 remain.
    assert uses_after[key] == 5
    assert 15 + uses_after[key] <= 25
    assert reserved(path, key) == 25
    assert len(uses_after) == 2
    for message_id, envelope in before:
        assert ring.open(Q, message_id, envelope) == b"before the crash"
    ring.close()


def test_threads_share_the_counts(path: str, master: bytes) -> None:
    ring = Keyring(path, master, rotate_after_uses=1000, reserve_block=7)
    results: list[list[tuple[bytes, bytes]]] = [[] for _ in range(8)]

    def work(out: list[tuple[bytes, bytes]]) -> None:
        for _ in range(2000):
            message_id = mid()
            out.append((message_id, ring.seal(Q, message_id, b"t")))

    threads = [threading.Thread(target=work, args=(out,)) for out in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sealed = [pair for out in results for pair in out]
    uses = Counter(key_id_of(envelope) for _, envelope in sealed)
    assert sum(uses.values()) == 16_000
    assert max(uses.values()) <= 1000
    assert len({envelope[9:21] for _, envelope in sealed}) == 16_000
    assert all(ring.open(Q, m, e) == b"t" for m, e in sealed)
    ring.close()


# --- keys at rest ------------------------------------------------------------------------------


def test_another_master_key_cannot_open(tmp_path: Path, path: str, master: bytes) -> None:
    ring = Keyring(path, master)
    message_id = mid()
    envelope = ring.seal(Q, message_id, b"secret")
    ring.close()

    # Another keyring, under another master key, with a key of the same id for the queue.
    other = Keyring(str(tmp_path / "other.sqlite3"), os.urandom(32))
    assert key_id_of(other.seal(Q, mid(), b"x")) == key_id_of(envelope)
    with pytest.raises(SealError):
        other.open(Q, message_id, envelope)
    other.close()

    # This keyring's file under another master key: refused at once.
    with pytest.raises(ConfigError, match="master key"):
        Keyring(path, os.urandom(32))


def test_wrapped_keys_are_not_the_raw_keys(path: str, master: bytes) -> None:
    ring = Keyring(path, master)
    message_id = mid()
    envelope = ring.seal(Q, message_id, b"secret")
    ring.rotate(Q)
    ring.seal(Q, mid(), b"secret")
    ring.close()
    kek = AESGCM(masterkey.subkey(master, "sse-kek"))
    on_disk = b"".join(Path(path + suffix).read_bytes() for suffix in ("", "-wal", "-shm")
                       if Path(path + suffix).exists())
    stored = rows(path)
    assert len(stored) == 2
    for key_id, queue_id, wrapped, _, _, _ in stored:
        assert len(wrapped) == 12 + 32 + 16
        raw = kek.decrypt(wrapped[:12], wrapped[12:], b"conveyor-sse-key/v1\x00"
                          + key_id.to_bytes(4, "big") + queue_id.encode())
        assert len(raw) == 32
        assert raw not in wrapped
        assert raw not in on_disk
        if key_id == key_id_of(envelope):
            # It is the real data key: it opens the envelope by the documented format.
            aad = b"conveyor-sse/v1\x00" + Q.encode() + b"\x00" + message_id
            assert AESGCM(raw).decrypt(envelope[9:21], envelope[21:], aad) == b"secret"
    assert masterkey.subkey(master, "sse-kek") not in on_disk
    assert master not in on_disk


def test_a_wrapped_key_moved_to_another_row_does_not_unwrap(path: str, master: bytes) -> None:
    ring = Keyring(path, master)
    a, b = mid(), mid()
    ea = ring.seal(Q, a, b"a")
    ring.seal(Q2, b, b"b")
    ring.close()
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        # Give key 1's row the wrapped key of key 2: the swap itself must not work.
        wrapped = db.execute("SELECT wrapped FROM data_keys WHERE key_id = 2").fetchone()[0]
        db.execute("UPDATE data_keys SET wrapped = ? WHERE key_id = 1", (wrapped,))
    forge_checks(path, sse.TABLE)  # as an attacker with write access would
    again = Keyring(path, master)  # the newest key (2) still unwraps
    with pytest.raises(SealError, match="unwrap"):
        again.open(Q, a, ea)
    again.close()


def test_closed_keyring_refuses(ring: Keyring) -> None:
    message_id = mid()
    envelope = ring.seal(Q, message_id, b"x")
    ring.close()
    with pytest.raises(SealError, match="closed"):
        ring.seal(Q, mid(), b"x")
    with pytest.raises(SealError, match="closed"):
        ring.open(Q, message_id, envelope)
    ring.close()  # twice is harmless


def test_bad_settings_are_refused(path: str, master: bytes) -> None:
    with pytest.raises(ConfigError):
        Keyring(path, master, rotate_after_uses=0)
    with pytest.raises(ConfigError):
        Keyring(path, master, rotate_after_uses=sse.ROTATE_AFTER_USES + 1)
    with pytest.raises(ConfigError):
        Keyring(path, master, reserve_block=0)
    with pytest.raises(ConfigError):
        Keyring(path, master, rotate_period_s=-1)


def test_default_bounds() -> None:
    assert sse.RESERVE_BLOCK == 65536
    assert sse.ROTATE_AFTER_USES == 2**31 - sse.RESERVE_BLOCK
    assert sse.ROTATE_AFTER_USES + sse.RESERVE_BLOCK <= 2**32 // 2


# --- the master key file -----------------------------------------------------------------------


def test_master_key_is_created_0600_and_read_back(tmp_path: Path) -> None:
    key_path = str(tmp_path / masterkey.FILE_NAME)
    key = masterkey.load_or_create(key_path)
    assert len(key) == 32
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert masterkey.load_or_create(key_path) == key
    assert masterkey.subkey(key, "sse-kek") != masterkey.subkey(key, "access-keys")


def test_master_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    key_path = str(tmp_path / masterkey.FILE_NAME)
    masterkey.load_or_create(key_path)
    os.chmod(key_path, 0o644)
    with pytest.raises(ConfigError, match="0600"):
        masterkey.load_or_create(key_path)
    os.chmod(key_path, 0o640)
    with pytest.raises(ConfigError):
        masterkey.load_or_create(key_path)


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_master_key_of_wrong_length_is_refused(tmp_path: Path, size: int) -> None:
    key_path = tmp_path / masterkey.FILE_NAME
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, os.urandom(size))
    os.close(fd)
    with pytest.raises(ConfigError, match="32 bytes"):
        masterkey.load_or_create(str(key_path))


_SEALING_CHILD = """
import os, sys
from server.protection.sse import Keyring, key_id_of
path, master, count = sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3])
ring = Keyring(path, master, rotate_after_uses=50, reserve_block=5)
print(" ".join(str(key_id_of(ring.seal("000000000000/orders", os.urandom(16), b"x")))
               for _ in range(count)))
ring.close()
"""


def test_processes_sharing_the_keyring_never_overrun_a_key(path: str, master: bytes) -> None:
    """A server's workers seal with one keyring file at once: their blocks of uses never
    overlap, so a key's uses summed over them stay within its bound."""
    Keyring(path, master).close()
    children = [subprocess.Popen([sys.executable, "-c", _SEALING_CHILD, path, master.hex(),
                                  "600"], cwd=ROOT, stdout=subprocess.PIPE)
                for _ in range(3)]
    uses: Counter[int] = Counter()
    for child in children:
        out, _ = child.communicate(timeout=120)
        assert child.returncode == 0
        uses.update(int(k) for k in out.split())
    assert sum(uses.values()) == 1800
    assert max(uses.values()) <= 50, uses
    assert all(r[4] <= 50 for r in rows(path))


class _FailingCommit:
    """A keyring's connection whose next COMMIT fails, as a full disk makes it."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.armed = True

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
        if sql == "COMMIT" and self.armed:
            self.armed = False
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self.db, name)


@pytest.mark.parametrize("first", ["new key", "new block"])
def test_nothing_is_sealed_under_a_key_or_block_whose_commit_failed(
        path: str, master: bytes, first: str) -> None:
    ring = Keyring(path, master, rotate_after_uses=1000, reserve_block=2)
    if first == "new block":
        ring.seal(Q, mid(), b"x")
        ring.seal(Q, mid(), b"x")  # the block is spent: the next seal reserves
    real = ring._db
    assert real is not None
    ring._db = _FailingCommit(real)  # type: ignore[assignment]
    with pytest.raises(sqlite3.OperationalError):
        ring.seal(Q, mid(), b"refused")
    message_id = mid()
    envelope = ring.seal(Q, message_id, b"acknowledged")
    ring._db = real
    ring.close()
    reopened = Keyring(path, master, rotate_after_uses=1000, reserve_block=2)
    assert reopened.open(Q, message_id, envelope) == b"acknowledged"
    key = key_id_of(envelope)
    assert reserved(path, key) >= (4 if first == "new block" else 1)
    reopened.close()
