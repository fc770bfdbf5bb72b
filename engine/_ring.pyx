"""Consistent-hash ring: weighted nodes placed as virtual nodes on a 64-bit circle.

A node of weight w owns ``round(vnodes * w)`` points at xxh3-64 of ``"{node}#{i}"``. The
points live in a sorted numpy uint64 array; a key belongs to the first point at or after
xxh3-64 of its UTF-8 bytes, wrapping around. Adding or removing one node of N therefore
moves about 1/N of the keys, and only to or from that node.

The ring is a pure function of its (node, weight) set: node names are sorted before points
are laid out, so every process that adds the same nodes, in any order, agrees.

Placement policy (replica counts, what a node is) belongs to the callers. Not thread-safe
for add/remove; lookups may run concurrently with each other.
"""

cimport numpy as cnp
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdint cimport int32_t, uint64_t

from engine._xxh cimport XXH3_64bits

import math

import numpy as np

from engine.errors import ConfigError, EmptyRingError, NodeNotFoundError

cnp.import_array()

# A generous cap on one node's virtual nodes, so a typo in a weight cannot exhaust memory.
VNODES_PER_NODE_MAX = 1 << 20


cdef int hash_key(object key, uint64_t* out) except -1:
    cdef const char* p
    cdef Py_ssize_t n
    cdef Py_buffer view
    if isinstance(key, str):
        p = PyUnicode_AsUTF8AndSize(key, &n)
        out[0] = XXH3_64bits(p, <size_t>n)
    elif type(key) is bytes:
        out[0] = XXH3_64bits(PyBytes_AS_STRING(key), <size_t>PyBytes_GET_SIZE(key))
    else:
        PyObject_GetBuffer(key, &view, PyBUF_SIMPLE)
        out[0] = XXH3_64bits(view.buf, <size_t>view.len)
        PyBuffer_Release(&view)
    return 0


def key_hash(key):
    """The ring position of a key (str, bytes or any bytes-like object)."""
    cdef uint64_t h
    hash_key(key, &h)
    return h


cdef class HashRing:
    """Weighted consistent-hash ring with ``vnodes`` points per unit of weight."""

    def __cinit__(self, vnodes=128):
        if (not isinstance(vnodes, int) or isinstance(vnodes, bool)
                or not 1 <= vnodes <= VNODES_PER_NODE_MAX):
            raise ConfigError("vnodes", vnodes, f"must be an integer in 1..{VNODES_PER_NODE_MAX}")
        self.vnodes = vnodes
        self._weights = {}
        self._points = {}
        self._names = []
        self._n = 0
        self._rebuild()

    def add(self, str node, weight=1):
        """Add a node, or change its weight if present."""
        if not node:
            raise ConfigError("node", node, "must be a non-empty string")
        if (not isinstance(weight, (int, float)) or isinstance(weight, bool)
                or not 0 < weight < math.inf):
            raise ConfigError("weight", weight, "must be a positive, finite number")
        if self.vnodes * weight > VNODES_PER_NODE_MAX:
            raise ConfigError("weight", weight, f"gives more than {VNODES_PER_NODE_MAX} points")
        cdef uint64_t h
        count = max(1, round(self.vnodes * weight))
        points = np.empty(count, dtype=np.uint64)
        for i in range(count):
            hash_key(f"{node}#{i}", &h)
            points[i] = h
        self._weights[node] = weight
        self._points[node] = points
        self._rebuild()

    def remove(self, str node):
        if node not in self._weights:
            raise NodeNotFoundError(node)
        del self._weights[node]
        del self._points[node]
        self._rebuild()

    cdef int _rebuild(self) except -1:
        self._names = sorted(self._weights)
        if self._names:
            positions = np.concatenate([self._points[name] for name in self._names])
            owners = np.concatenate([
                np.full(len(self._points[name]), i, dtype=np.int32)
                for i, name in enumerate(self._names)
            ])
            order = np.lexsort((owners, positions))
            positions = np.ascontiguousarray(positions[order])
            owners = np.ascontiguousarray(owners[order])
        else:
            positions = np.empty(0, dtype=np.uint64)
            owners = np.empty(0, dtype=np.int32)
        positions.flags.writeable = False
        owners.flags.writeable = False
        self._positions = positions
        self._owners = owners
        self._pos = <const uint64_t*>cnp.PyArray_DATA(positions)
        self._own = <const int32_t*>cnp.PyArray_DATA(owners)
        self._n = len(positions)
        return 0

    cdef Py_ssize_t _first_at_or_after(self, uint64_t h) noexcept:
        cdef Py_ssize_t lo = 0
        cdef Py_ssize_t hi = self._n
        cdef Py_ssize_t mid
        while lo < hi:
            mid = (lo + hi) >> 1
            if self._pos[mid] < h:
                lo = mid + 1
            else:
                hi = mid
        return 0 if lo == self._n else lo

    def lookup(self, key):
        """The node that owns key."""
        cdef uint64_t h
        if self._n == 0:
            raise EmptyRingError()
        hash_key(key, &h)
        return self._names[self._own[self._first_at_or_after(h)]]

    def preference_list(self, key, Py_ssize_t n):
        """Up to n distinct nodes for key, walking clockwise from its position.

        The first is ``lookup(key)``. Fewer than n come back only when the ring has fewer
        than n nodes.
        """
        cdef uint64_t h
        cdef Py_ssize_t want
        cdef Py_ssize_t i
        cdef Py_ssize_t step
        cdef Py_ssize_t j
        cdef int32_t owner
        cdef list out = []
        cdef int32_t picked[64]
        cdef Py_ssize_t npicked = 0
        if n < 0:
            raise ValueError("n must not be negative")
        if self._n == 0:
            raise EmptyRingError()
        want = min(n, len(self._names))
        if want > 64:
            return self._long_preference_list(key, want)
        hash_key(key, &h)
        i = self._first_at_or_after(h)
        step = 0
        while npicked < want and step < self._n:
            owner = self._own[i]
            for j in range(npicked):
                if picked[j] == owner:
                    break
            else:
                picked[npicked] = owner
                npicked += 1
                out.append(self._names[owner])
            i += 1
            if i == self._n:
                i = 0
            step += 1
        return out

    def _long_preference_list(self, key, Py_ssize_t want):
        cdef uint64_t h
        hash_key(key, &h)
        start = self._first_at_or_after(h)
        seen = set()
        out = []
        for step in range(self._n):
            owner = self._own[(start + step) % self._n]
            if owner not in seen:
                seen.add(owner)
                out.append(self._names[owner])
                if len(out) == want:
                    break
        return out

    @property
    def nodes(self):
        """Node names, sorted."""
        return list(self._names)

    def weight(self, str node):
        if node not in self._weights:
            raise NodeNotFoundError(node)
        return self._weights[node]

    @property
    def positions(self):
        """The sorted virtual-node positions (read-only numpy uint64 array)."""
        # A view of a read-only array cannot be made writeable again by the caller.
        return self._positions.view()

    def __len__(self):
        return len(self._names)

    def __contains__(self, node):
        return node in self._weights

    def __repr__(self):
        return f"<HashRing {len(self._names)} nodes, {self._n} points>"
