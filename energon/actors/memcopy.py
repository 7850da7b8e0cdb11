"""Copying a tensor into shared memory: numpy on this thread, big copies split over helper threads.

torch's copy_ would split a big copy over its intra-op threads too, but they wait for each other,
which on a busy host can stall even a small copy for milliseconds. Here the caller copies chunks
itself and helpers take the chunks they get to, so a busy host costs at most the chunks in hand.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading


def copy_into(dst, t) -> None:
    """Copies tensor t (any strides, any device) into dst, a uint8 ndarray of exactly its size;
    returns once done. A CPU tensor is copied by numpy (a memcpy when contiguous), from
    PARALLEL_COPY_MIN bytes by this thread and the helpers together."""
    import torch

    same_size_int = _INT_OF_SIZE.get(t.element_size())
    if t.device.type != "cpu" or not same_size_int or t.is_conj() or t.is_neg():
        torch.from_numpy(dst).view(t.dtype).view(t.shape).copy_(t)  # GPU, complex128, views
        return
    src = t.view(getattr(torch, same_size_int)).numpy()  # same bytes, any strides
    dst = dst.view(src.dtype).reshape(src.shape)
    if src.nbytes < PARALLEL_COPY_MIN or not _COPIERS.helpers:
        sys.modules["numpy"].copyto(dst, src, casting="no")
        return
    if src.flags.c_contiguous:
        src, dst = src.reshape(-1), dst.reshape(-1)
    chunks = min(len(src), max(2, src.nbytes // COPY_CHUNK))
    bounds = [len(src) * i // chunks for i in range(chunks + 1)]
    _COPIERS.copy([(dst[a:b], src[a:b]) for a, b in itertools.pairwise(bounds) if b > a])


_INT_OF_SIZE = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}
PARALLEL_COPY_MIN = 8 << 20  # smaller copies are not worth waking a helper thread
COPY_CHUNK = 4 << 20


class _CopyJob:
    """(dst, src) ndarray pairs that any number of threads copy, each taking the next pair."""

    def __init__(self, pairs: list):
        self.pairs = pairs
        self.next = 0
        self.left = len(pairs)
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.done = threading.Event()

    def run(self) -> None:
        copyto = sys.modules["numpy"].copyto
        while True:
            with self.lock:
                i = self.next
                if i >= len(self.pairs):
                    return
                self.next = i + 1
            try:
                copyto(*self.pairs[i], casting="no")  # numpy lets go of the GIL meanwhile
            except BaseException as exc:
                self.error = exc
            with self.lock:
                self.left -= 1
                if self.left == 0:
                    self.done.set()


class _Copiers:
    """Daemon threads that help copy big tensors into segments (one fewer than the CPUs this
    process may use, at most 3), started on first use. The caller copies too, and copies any
    chunk no helper has taken yet, so on a busy host it waits at most for the chunks in hand."""

    def __init__(self):
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
        self.helpers = min(3, cpus - 1)
        self._jobs = None
        self._lock = threading.Lock()

    def copy(self, pairs: list) -> None:
        """Copies every (dst, src) pair; returns when all are done. Raises what a copy raised."""
        job = _CopyJob(pairs)
        jobs = self._start()
        for _ in range(self.helpers):
            jobs.put(job)
        job.run()
        job.done.wait()
        if job.error is not None:
            raise job.error

    def _start(self):
        with self._lock:
            if self._jobs is None:
                import queue

                self._jobs = queue.SimpleQueue()
                for i in range(self.helpers):
                    name = f"energon-shm-copy-{i}"
                    threading.Thread(target=self._serve, name=name, daemon=True).start()
            return self._jobs

    def _serve(self) -> None:
        while True:
            self._jobs.get().run()


_COPIERS = _Copiers()
