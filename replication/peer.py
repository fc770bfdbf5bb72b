"""Authenticated connections between nodes: every byte on the inter-node port after the
magic is either the handshake or a sealed frame (drawn in docs/FORMAT.md, "Peer channel").

Every node holds the cluster's peer key, derived from the cluster secret. A connection
proves the key in both directions before either side acts on a byte of the other:

1. The caller (initiator) sends its magic, a fresh nonce, its own node id and the id of
   the node it means to reach.
2. The answerer (responder) closes the connection at once if the id it was meant to be is
   not its own; otherwise it sends its own fresh nonce and a proof: an HMAC under the
   peer key over the transcript (magic, both nonces, both ids).
3. The caller checks the answerer's proof, then sends its own over the same transcript.
   Each proof is labelled with its role, so one cannot be reflected as the other.

Both ends then derive two session keys from the peer key and the transcript, one per
direction, and every frame from then on is ``u32 length | AES-GCM(frame)`` under the
sender's key with a counter nonce. A frame replayed, reordered, cut, dropped or made up
fails its tag and ends the connection. Relaying the handshake gains a relay nothing: it
holds neither session key. And since the session is bound to both node ids, an address
that sends a node's connection to another node (an etcd writer can change addresses) is
refused rather than taken for the node it names.

Before the caller's proof arrives the answerer has sent only its nonce and its proof:
no epoch, no error, no detail. Until then the listener allows a fixed number of
handshakes at once and closes the oldest past it (replication.listener).

Why a shared-key handshake and not mutual TLS: every node already shares the master key
(access keys and data keys are wrapped under it), so peer authentication costs an
operator nothing more to deploy and rotate; nothing here needs certificates, whose
expiry is an outage of its own; and the frames are already length-prefixed, so sealing
each costs one AES-GCM call (hardware AES) and no extra copy of the stream.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from engine.errors import ConfigError
from replication import frames as fr

KEY_BYTES = 32
NONCE_BYTES = 32
PROOF_BYTES = 32
TAG_BYTES = 16
# A node id travels with a one-byte length.
NODE_ID_BYTES_MAX = 255
# The shortest cluster secret taken from a file: as strong as the key derived from it.
SECRET_BYTES_MIN = 32

_LENGTH = struct.Struct(">I")
_COUNTER = struct.Struct(">4xQ")  # AES-GCM's 12-byte nonce: 4 zero bytes, a u64 counter
_INITIATOR, _RESPONDER = b"conveyor peer initiator\n", b"conveyor peer responder\n"


def peer_key(secret: bytes) -> bytes:
    """The key every node proves, from the cluster secret (a file's bytes or a subkey of
    the master key): through HKDF, so the secret itself is never used as a key."""
    if len(secret) < SECRET_BYTES_MIN:
        raise ConfigError("cluster secret", f"{len(secret)} bytes",
                          f"it needs at least {SECRET_BYTES_MIN}")
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                info=b"conveyor peer key").derive(secret)


def _node_id_bytes(node_id: str) -> bytes:
    encoded = node_id.encode()
    if not encoded or len(encoded) > NODE_ID_BYTES_MAX:
        raise ConfigError("node id", node_id, f"it needs 1 to {NODE_ID_BYTES_MAX} bytes")
    return encoded


class Channel:
    """One connection to another node: whole frames both ways, sealed (or, with peer
    authentication off, plain).

    ``peer`` is the other node's id as the handshake bound it.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 peer: str, frame_bytes_max: int, keys: tuple[bytes, bytes] | None) -> None:
        self.peer = peer
        self._reader = reader
        self._writer = writer
        self._frame_bytes_max = frame_bytes_max
        self._seal = AESGCM(keys[0]) if keys is not None else None
        self._open = AESGCM(keys[1]) if keys is not None else None
        self._sent = 0
        self._received = 0

    def send(self, frame: bytes) -> None:
        """Queue one frame for the peer (``drain`` waits for room)."""
        if self._seal is not None:
            frame = self._seal.encrypt(_COUNTER.pack(self._sent), frame, None)
            self._sent += 1
        # One write: the transport sends at once what it is given when it holds nothing
        # unsent, and a write each would cost a system call (and the peer a wake-up) each.
        self._writer.writelines((_LENGTH.pack(len(frame)), frame))

    async def receive(self) -> bytes:
        """The next frame; IncompleteReadError at the end of the stream, ProtocolError for
        a frame too long or one that fails its tag."""
        (length,) = _LENGTH.unpack(await self._reader.readexactly(_LENGTH.size))
        limit = self._frame_bytes_max + (TAG_BYTES if self._open is not None else 0)
        if length > limit:
            raise fr.ProtocolError(f"a frame of {length} bytes, over the limit of {limit}")
        frame = await self._reader.readexactly(length)
        if self._open is not None:
            try:
                frame = self._open.decrypt(_COUNTER.pack(self._received), frame, None)
            except InvalidTag:
                raise fr.ProtocolError("a frame failed authentication") from None
            self._received += 1
        return frame

    async def drain(self) -> None:
        await self._writer.drain()

    def is_closing(self) -> bool:
        return self._writer.is_closing()

    def close(self) -> None:
        self._writer.close()

    def abort(self) -> None:
        """Close at once, dropping whatever waits to be sent (a peer that stopped
        reading would otherwise keep it, and the connection, alive)."""
        self._writer.transport.abort()

    def buffered(self) -> int:
        """Bytes sent but not yet taken by the kernel."""
        return self._writer.transport.get_write_buffer_size()

    @property
    def peername(self) -> object:
        return self._writer.get_extra_info("peername")

    @property
    def writer(self) -> asyncio.StreamWriter:
        """The transport under the channel (socket options; tests)."""
        return self._writer


class Peers:
    """This node's side of peer authentication: its id and the cluster's peer key.

    ``key`` None turns authentication off: the handshake carries only the magic and the
    two node ids, and frames go plain. That exists for tests that show an attack which
    authentication stops (their negative controls), and nothing else.
    """

    def __init__(self, node_id: str, key: bytes | None) -> None:
        self.node_id = node_id
        self._id = _node_id_bytes(node_id)
        self._key = key

    @property
    def authenticated(self) -> bool:
        return self._key is not None

    def fingerprint(self) -> str:
        """Names the peer key without revealing it: nodes compare theirs through etcd, so
        that one started with another secret says so rather than fail every link."""
        if self._key is None:
            return "off"
        return hmac.new(self._key, b"conveyor peer key fingerprint", hashlib.sha256
                        ).hexdigest()[:32]

    async def connect(self, address: tuple[str, int], node_id: str, magic: bytes,
                      frame_bytes_max: int, timeout: float) -> Channel:
        """A channel to node_id at address, opened with magic. Raises ProtocolError if the
        answerer does not prove the key (or is not node_id), OSError or TimeoutError if it
        cannot be reached."""
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(*address)
        try:
            async with asyncio.timeout(timeout):
                return await self._initiate(reader, writer, node_id, magic, frame_bytes_max)
        except BaseException:
            writer.close()
            raise

    async def _initiate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        node_id: str, magic: bytes, frame_bytes_max: int) -> Channel:
        answerer = _node_id_bytes(node_id)
        ids = _with_length(self._id) + _with_length(answerer)
        if self._key is None:
            writer.write(magic + ids)
            return Channel(reader, writer, node_id, frame_bytes_max, None)
        nonce = os.urandom(NONCE_BYTES)
        writer.write(magic + nonce + ids)
        reply = await reader.readexactly(NONCE_BYTES + PROOF_BYTES)
        transcript = magic + nonce + reply[:NONCE_BYTES] + ids
        if not hmac.compare_digest(reply[NONCE_BYTES:], self._proof(_RESPONDER, transcript)):
            raise fr.ProtocolError(f"node {node_id} did not prove the cluster's peer key")
        writer.write(self._proof(_INITIATOR, transcript))
        sending, receiving = self._session_keys(transcript)
        return Channel(reader, writer, node_id, frame_bytes_max, (sending, receiving))

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     magic: bytes, frame_bytes_max: int) -> Channel:
        """The answerer's side, after the listener read magic. Raises ProtocolError if the
        caller does not prove the key or meant another node; the caller learns nothing
        but the answerer's proof (the listener bounds the time)."""
        nonce = b"" if self._key is None else await reader.readexactly(NONCE_BYTES)
        caller = await _read_with_length(reader)
        meant = await _read_with_length(reader)
        if meant != self._id:
            raise fr.ProtocolError("a connection meant for another node")
        ids = _with_length(caller) + _with_length(meant)
        try:
            peer = caller.decode()
        except UnicodeDecodeError:
            raise fr.ProtocolError("a node id that is not UTF-8") from None
        if self._key is None:
            return Channel(reader, writer, peer, frame_bytes_max, None)
        mine = os.urandom(NONCE_BYTES)
        transcript = magic + nonce + mine + ids
        writer.write(mine + self._proof(_RESPONDER, transcript))
        proof = await reader.readexactly(PROOF_BYTES)
        if not hmac.compare_digest(proof, self._proof(_INITIATOR, transcript)):
            raise fr.ProtocolError("the caller did not prove the cluster's peer key")
        sending, receiving = self._session_keys(transcript)
        return Channel(reader, writer, peer, frame_bytes_max, (receiving, sending))

    def _proof(self, role: bytes, transcript: bytes) -> bytes:
        assert self._key is not None
        return hmac.new(self._key, role + transcript, hashlib.sha256).digest()

    def _session_keys(self, transcript: bytes) -> tuple[bytes, bytes]:
        """(initiator -> responder, responder -> initiator): fresh for every connection,
        since both nonces are in the transcript."""
        assert self._key is not None
        keys = HKDF(algorithm=hashes.SHA256(), length=2 * KEY_BYTES, salt=None,
                    info=b"conveyor peer session\n" + transcript).derive(self._key)
        return keys[:KEY_BYTES], keys[KEY_BYTES:]


def _with_length(data: bytes) -> bytes:
    return bytes((len(data),)) + data


async def _read_with_length(reader: asyncio.StreamReader) -> bytes:
    (length,) = await reader.readexactly(1)
    return await reader.readexactly(length)
