"""The master key: 32 random bytes in a file only its owner can read.

Everything the server keeps secret at rest is protected by keys derived from it with
HKDF-SHA256, one subkey per purpose, so that no two uses share a key: the access keys'
secrets (server/protection/keystore.py) and the queues' data keys
(server/protection/sse.py) are each wrapped under their own subkey. Losing the file
loses every encrypted message and every access key; docs/OPERATIONS.md says how to back it up.
"""

from __future__ import annotations

import os
import stat
import tempfile

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from engine.errors import ConfigError
from engine.files import fsync_dir, write_all

KEY_BYTES = 32
FILE_NAME = "master.key"


def load_or_create(path: str) -> bytes:
    """The key in ``path``, creating the file (mode 0600, exclusive) if it is absent.

    A file readable by group or others is refused: a key that has been exposed is not a
    key. The create is exclusive, so two servers starting at once agree on one key.
    """
    try:
        return load(path)
    except FileNotFoundError:
        pass
    # The key is written to a temporary file and hard-linked into place: the link is
    # exclusive (it fails if the file exists) and makes the file appear with its 32 bytes
    # already in it. Creating ``path`` itself with O_EXCL and then writing would let a
    # process starting at the same moment read it empty and refuse it.
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".master-key-")  # mode 0600
    try:
        try:
            write_all(fd, os.urandom(KEY_BYTES), temporary)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temporary, path)
        except FileExistsError:
            return load(path)  # another process made it first: use that one
    finally:
        os.unlink(temporary)
    fsync_dir(directory)
    return load(path)


def load(path: str, what: str = "master key file") -> bytes:
    """The key in an existing file of KEY_BYTES bytes that only its owner can read (the
    master key's, or the cluster secret's: the same format)."""
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(what, path,
                          f"its mode is {stat.S_IMODE(mode):o}; it must be 0600 or stricter")
    with open(path, "rb") as f:
        key = f.read(KEY_BYTES + 1)
    if len(key) != KEY_BYTES:
        raise ConfigError(what, path, f"it must hold exactly {KEY_BYTES} bytes")
    return key


def subkey(master: bytes, purpose: str) -> bytes:
    """A 32-byte key for one purpose ("access-keys", "sse-kek" ...), derived from master."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                info=f"conveyor/{purpose}/v1".encode()).derive(master)
