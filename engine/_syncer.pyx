"""The group commit's fsyncs for an event loop, on native threads that never take the GIL.

A log's asyncio waiters are released by one fdatasync of everything appended so far
(engine/log.py). Run on a Python thread, that round takes the GIL twice (to start, and to
report back) from an event loop that holds it nearly all the time, and a busy loop makes
the round wait for it: on two cores with a worker per core, a third of a round's time went
to the hand-offs. Here the fdatasync runs on a thread of C only, and its completion is
counted on an eventfd that the loop watches (engine/background.py), so the loop itself
reads the results at its next turn, under the GIL it holds anyway.

Each Syncer belongs to one event loop. Its threads start on first use, up to
``max_threads`` (fdatasyncs of different logs overlap, as on the shared pool), and stop
when the Syncer is collected. A job holds a reference to its Syncer until its completion
is taken, so no Syncer goes away with a job in flight.

Linux only (eventfd); engine/background.py falls back to the shared Python pool where
this module or the loop's reader support is missing.
"""

from cpython.ref cimport Py_DECREF, Py_INCREF, PyObject
from libc.errno cimport EINTR, errno
from libc.stdint cimport uint64_t
from libc.stdlib cimport free, malloc
from posix.signal cimport SIG_BLOCK, sigfillset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.types cimport sigset_t
from posix.unistd cimport getpid

import os


cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_create(pthread_t* thread, void* attr,
                       void* (*start)(void*) noexcept nogil, void* arg)
    int pthread_join(pthread_t thread, void** result)
    int pthread_mutex_init(pthread_mutex_t* mutex, void* attr)
    int pthread_mutex_destroy(pthread_mutex_t* mutex)
    int pthread_mutex_lock(pthread_mutex_t* mutex)
    int pthread_mutex_unlock(pthread_mutex_t* mutex)
    int pthread_cond_init(pthread_cond_t* cond, void* attr)
    int pthread_cond_destroy(pthread_cond_t* cond)
    int pthread_cond_wait(pthread_cond_t* cond, pthread_mutex_t* mutex)
    int pthread_cond_signal(pthread_cond_t* cond)
    int pthread_cond_broadcast(pthread_cond_t* cond)
    int pthread_sigmask(int how, const sigset_t* set, sigset_t* old)

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    int EFD_CLOEXEC
    int EFD_NONBLOCK

cdef extern from "<unistd.h>" nogil:
    int c_fdatasync "fdatasync"(int fd)
    int c_close "close"(int fd)
    ssize_t c_write "write"(int fd, const void* buf, size_t count)
    ssize_t c_read "read"(int fd, void* buf, size_t count)
    int usleep(unsigned int usec)


DEF THREADS_CAP = 16

# Test-only (set_sync_for_tests): each sync first sleeps this long, then reports this
# errno (0: success) without being made, or (-1) is made.
cdef unsigned int _test_delay_us = 0
cdef int _test_error = -1


cdef struct Job:
    int fd
    int err
    double seconds
    PyObject* token   # owned: the reference taken at submit, given back by take()
    PyObject* owner   # owned: the Syncer, kept alive while the job is in flight
    Job* next


cdef struct Shared:
    pthread_mutex_t mutex
    pthread_cond_t wake
    Job* pending_head
    Job* pending_tail
    Job* done_head
    Job* done_tail
    int idle
    int stopping
    int efd


cdef inline double _monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef void* _serve(void* arg) noexcept nogil:
    """A sync thread: take a job, fdatasync and close its descriptor, hand it back."""
    cdef Shared* shared = <Shared*>arg
    cdef Job* job
    cdef double started
    cdef uint64_t one = 1
    cdef sigset_t every
    # Signals are for the interpreter's threads; here one would only interrupt a sync.
    sigfillset(&every)
    pthread_sigmask(SIG_BLOCK, &every, NULL)
    pthread_mutex_lock(&shared.mutex)
    while True:
        while shared.pending_head == NULL and not shared.stopping:
            shared.idle += 1
            pthread_cond_wait(&shared.wake, &shared.mutex)
            shared.idle -= 1
        if shared.pending_head == NULL:
            break  # stopping, and nothing left to do
        job = shared.pending_head
        shared.pending_head = job.next
        if shared.pending_head == NULL:
            shared.pending_tail = NULL
        pthread_mutex_unlock(&shared.mutex)

        started = _monotonic()
        job.err = 0
        if _test_delay_us:
            usleep(_test_delay_us)
        if _test_error >= 0:
            job.err = _test_error
        else:
            while c_fdatasync(job.fd) != 0:
                if errno != EINTR:  # retried, as os.fdatasync does (PEP 475)
                    job.err = errno
                    break
        c_close(job.fd)
        job.seconds = _monotonic() - started
        job.next = NULL

        pthread_mutex_lock(&shared.mutex)
        if shared.done_tail == NULL:
            # The first completion since the loop last took them: one wake-up for all
            # that finish before it looks.
            shared.done_head = job
            c_write(shared.efd, &one, sizeof(one))
        else:
            shared.done_tail.next = job
        shared.done_tail = job
    pthread_mutex_unlock(&shared.mutex)
    return NULL


cdef class Syncer:
    """fdatasync on native threads for one event loop; completions counted on fileno()."""

    cdef Shared shared
    cdef pthread_t threads[THREADS_CAP]
    cdef int started
    cdef int max_threads
    cdef int pid
    cdef bint ready

    def __cinit__(self, int max_threads):
        if not 1 <= max_threads <= THREADS_CAP:
            raise ValueError(f"max_threads must be 1..{THREADS_CAP}, not {max_threads}")
        self.max_threads = max_threads
        self.pid = getpid()
        self.shared.efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
        if self.shared.efd < 0:
            raise OSError(errno, os.strerror(errno), "eventfd")
        pthread_mutex_init(&self.shared.mutex, NULL)
        pthread_cond_init(&self.shared.wake, NULL)
        self.ready = True

    def fileno(self):
        """The eventfd that becomes readable when completions are waiting for take()."""
        return self.shared.efd

    def submit(self, int fd, object token):
        """fdatasync fd, then close it; take() returns token with the outcome.

        The descriptor is the Syncer's once this returns (a duplicate, so that its file
        may be closed meanwhile). Raises RuntimeError, keeping nothing, if no thread can
        run the job (a thread cannot be started, or this process is a fork of the one
        that made the Syncer, whose threads it does not have)."""
        cdef Job* job
        cdef int failed = 0
        self._check_process()
        job = <Job*>malloc(sizeof(Job))
        if job == NULL:
            raise MemoryError()
        job.fd = fd
        job.token = <PyObject*>token
        job.owner = <PyObject*>self
        job.next = NULL
        # The job's references, before a thread can see it (and take() give them back).
        Py_INCREF(token)
        Py_INCREF(self)
        with nogil:
            pthread_mutex_lock(&self.shared.mutex)
            if self.shared.idle == 0 and self.started < self.max_threads:
                if pthread_create(&self.threads[self.started], NULL, _serve,
                                  &self.shared) == 0:
                    self.started += 1
                elif self.started == 0:
                    failed = 1
            if not failed:
                if self.shared.pending_tail == NULL:
                    self.shared.pending_head = job
                else:
                    self.shared.pending_tail.next = job
                self.shared.pending_tail = job
                pthread_cond_signal(&self.shared.wake)
            pthread_mutex_unlock(&self.shared.mutex)
        if failed:
            Py_DECREF(token)
            Py_DECREF(self)
            free(job)
            raise RuntimeError("no sync thread could be started")

    def take(self):
        """Completions since the last take: [(token, errno or 0, seconds in fdatasync)].

        Safe from any thread; each completion is returned once."""
        cdef Job* job
        cdef Job* following
        cdef uint64_t count
        self._check_process()
        with nogil:
            pthread_mutex_lock(&self.shared.mutex)
            job = self.shared.done_head
            self.shared.done_head = NULL
            self.shared.done_tail = NULL
            # Reset under the mutex: a thread that finishes after this writes it again.
            c_read(self.shared.efd, &count, sizeof(count))
            pthread_mutex_unlock(&self.shared.mutex)
        taken = []
        while job != NULL:
            token = <object>job.token
            Py_DECREF(token)  # the reference submit took; `token` holds one of its own
            taken.append((token, job.err, job.seconds))
            following = job.next
            Py_DECREF(<object>job.owner)
            free(job)
            job = following
        return taken

    def _check_process(self):
        if getpid() != self.pid:
            # A fork has none of the threads, and shares the eventfd with its parent.
            raise RuntimeError("a Syncer cannot be used in a forked process")

    def __dealloc__(self):
        cdef int i
        if not self.ready:
            return
        if getpid() != self.pid:
            # A fork's copy: its mutex and condition variable may be held or waited on by
            # the parent's threads, which this process does not have. Only the descriptor
            # is its own to close.
            c_close(self.shared.efd)
            return
        # No job is in flight (each holds a reference), so the threads are idle: they
        # wake, see nothing to do, and end.
        with nogil:
            pthread_mutex_lock(&self.shared.mutex)
            self.shared.stopping = 1
            pthread_cond_broadcast(&self.shared.wake)
            pthread_mutex_unlock(&self.shared.mutex)
            for i in range(self.started):
                pthread_join(self.threads[i], NULL)
        c_close(self.shared.efd)
        pthread_cond_destroy(&self.shared.wake)
        pthread_mutex_destroy(&self.shared.mutex)


def set_sync_for_tests(double delay_s=0, error=None):
    """Test-only switch, for every Syncer of the process: each sync first sleeps delay_s
    (a slow disk); then, with an errno, reports it without being made (0: the negative
    control of the power-loss tests, a sync that does nothing; EIO: a failed one).
    ``set_sync_for_tests()`` brings back real syncs."""
    global _test_delay_us, _test_error
    _test_delay_us = <unsigned int>(delay_s * 1e6)
    _test_error = -1 if error is None else int(error)
