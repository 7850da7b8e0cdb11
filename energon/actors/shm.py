"""Large tensors through shared memory when controller and worker share a host.

Each direction of a controller <-> worker connection has one Segment: an anonymous memfd (it has
no name under /dev/shm, so a crash cannot leave one behind: the kernel frees the memory once the
last process mapping it is gone). The controller creates both segments of a worker and names them
in the init message as (pid, fd, size, token); the worker opens /proc/<pid>/fd/<fd>, checks the
random token written at the segment's start, and says in its ready reply whether that worked. If it
did not (another host, another pid namespace, another user), tensors travel as ZeroMQ frames.

A segment is cut into UNIT-sized units; its first unit holds a token and one state byte per unit.
A block (a run of units holding one tensor) goes through
    FREE --sender writes the bytes (WRITING)--> SENT --receiver builds a tensor viewing it--> CLAIMED
    --that tensor (and every view of it) is garbage-collected--> FREE
The sender alone allocates, and reuses a block once its state is FREE again, so the receiver's
tensor stays valid for as long as it lives, with no copy on receipt. Units after a block's first are
marked CONT, so a receiver can check that a header names the block's exact size. A message the
receiver never reads keeps its blocks SENT until the connection ends (then the segment goes
whole); when a segment has no room, the tensor travels as a frame instead.
"""

from __future__ import annotations

import itertools
import math
import mmap
import os
import stat
import threading
import weakref
from dataclasses import dataclass

from energon.actors.memcopy import copy_into
from energon.errors import ProtocolError

UNIT = 64 * 1024
TOKEN_BYTES = 16
FREE, SENT, CLAIMED, CONT, WRITING = 0, 1, 2, 3, 4
DEFAULT_SEGMENT_BYTES = 1 << 30  # address space; memory is used only by the units touched
# tensors at least this big go through shared memory (below ~256 KiB a frame is as fast: see
# docs/benchmarks.md, "Actor runtime")
DEFAULT_MIN_BYTES = 512 << 10


@dataclass(frozen=True)
class SegmentSpec:
    """How a worker finds a controller's segment: /proc/<pid>/fd/<fd>, checked by token."""

    pid: int
    fd: int
    size: int
    token: bytes

    def to_meta(self) -> dict:
        return {"pid": self.pid, "fd": self.fd, "size": self.size, "token": self.token}


class Segment:
    """One mapped memfd: a token, one state byte per unit, then the data units."""

    def __init__(self, mm: mmap.mmap, size: int, token: bytes, name: str = ""):
        import numpy as np

        self.name = name  # the memfd's name (in /proc/<pid>/maps as /memfd:<name>)
        self.mm = mm
        self.size = size
        self.token = token
        self.id = int.from_bytes(token[:8], "little") >> 1  # names the segment in block specs
        self.units = size // UNIT
        self.first_data_unit = math.ceil((TOKEN_BYTES + self.units) / UNIT)
        self.states = np.frombuffer(mm, np.uint8, self.units, TOKEN_BYTES)
        self.bytes = np.frombuffer(mm, np.uint8)

    @classmethod
    def create(cls, size: int, name: str) -> tuple[Segment, int]:
        """A new segment of size bytes (rounded up to UNIT) and its memfd, which the caller
        closes once the peer has opened it. Raises OSError if memfd_create/mmap fail."""
        size = max(2, math.ceil(size / UNIT)) * UNIT
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            raise
        token = os.urandom(TOKEN_BYTES)
        mm[:TOKEN_BYTES] = token
        return cls(mm, size, token, name), fd

    @classmethod
    def open(cls, spec: dict) -> Segment | None:
        """The controller's segment described by spec (SegmentSpec.to_meta), or None if it cannot
        be opened from here or is not the one announced (another host or namespace)."""
        try:
            pid, fd, size, token = spec["pid"], spec["fd"], spec["size"], spec["token"]
            if not (type(size) is int and size >= 2 * UNIT and size % UNIT == 0):
                return None
            if type(token) is not bytes or len(token) != TOKEN_BYTES:
                return None
            mine = os.open(f"/proc/{int(pid)}/fd/{int(fd)}", os.O_RDWR | os.O_NONBLOCK)
        except (OSError, KeyError, TypeError, ValueError):
            return None
        try:
            info = os.fstat(mine)
            if not stat.S_ISREG(info.st_mode) or info.st_size != size:
                return None
            mm = mmap.mmap(mine, size, mmap.MAP_SHARED)
        except OSError:
            return None
        finally:
            os.close(mine)
        if mm[:TOKEN_BYTES] != token:
            mm.close()
            return None
        return cls(mm, size, token)


class SegmentWriter:
    """The sending side of a segment: allocates blocks, writes tensors, reuses freed blocks.

    Thread-safe (a worker sends from its event loop and from its sync thread).
    """

    def __init__(self, segment: Segment, min_bytes: int = DEFAULT_MIN_BYTES):
        self.segment = segment
        self.min_bytes = min_bytes
        self.fallbacks = 0  # tensors that went as frames for want of room
        self._free = [(segment.first_data_unit, segment.units - segment.first_data_unit)]
        self._sent: dict[int, int] = {}  # first unit -> units, for blocks not known FREE again
        self._lock = threading.Lock()

    def put(self, t) -> dict | None:
        """Copies tensor t (any strides, any device) into a new block; returns the block spec
        {seg, off, nbytes} for the header, or None if the segment has no room."""
        nbytes = t.numel() * t.element_size()
        units = -(-nbytes // UNIT)
        seg = self.segment
        with self._lock:
            start = self._allocate(units)
            if start is None:
                self.fallbacks += 1
                return None
            seg.states[start] = WRITING  # not FREE: another thread's _reclaim must not take it
            seg.states[start + 1 : start + units] = CONT
        off = start * UNIT
        try:
            copy_into(seg.bytes[off : off + nbytes], t)
        except BaseException:
            seg.states[start] = FREE  # reclaimed at the next put
            raise
        seg.states[start] = SENT  # published: the receiver may claim it from now on
        return {"seg": seg.id, "off": off, "nbytes": nbytes}

    def _allocate(self, units: int) -> int | None:
        # reclaim first, so the lowest free block (its pages already faulted in, on both sides)
        # is reused rather than fresh memory
        self._reclaim()
        start = self._first_fit(units)
        if start is not None:
            self._sent[start] = units
        return start

    def _first_fit(self, units: int) -> int | None:
        for i, (start, n) in enumerate(self._free):
            if n >= units:
                if n == units:
                    del self._free[i]
                else:
                    self._free[i] = (start + units, n - units)
                return start
        return None

    def _reclaim(self) -> None:
        """Returns blocks the receiver has freed to the free list."""
        states = self.segment.states
        done = [start for start in self._sent if states[start] == FREE]
        for start in done:
            units = self._sent.pop(start)
            states[start + 1 : start + units] = FREE
            self._free.append((start, units))
        if done:
            self._free.sort()
            merged = [self._free[0]]
            for start, n in self._free[1:]:
                last_start, last_n = merged[-1]
                if last_start + last_n == start:
                    merged[-1] = (last_start, last_n + n)
                else:
                    merged.append((start, n))
            self._free = merged


class SegmentReader:
    """The receiving side of a segment: turns block specs into tensors viewing the block."""

    def __init__(self, segment: Segment):
        self.segment = segment
        self._lock = threading.Lock()  # a worker decodes on two threads

    def take(self, spec: dict, dtype, shape: list, nbytes: int):
        """A tensor of dtype and shape viewing the block spec names; the block is freed when
        that tensor (with every view of it) is garbage-collected. Raises ProtocolError if spec
        names no block that was sent, or names one of another size."""
        import numpy as np
        import torch

        seg = self.segment
        sid, off, size = spec.get("seg"), spec.get("off"), spec.get("nbytes")
        if sid != seg.id or type(sid) is not int:
            raise ProtocolError(
                f"header names shared-memory segment {sid!r}, which is not this link's"
            )
        if type(off) is not int or type(size) is not int:
            raise ProtocolError("shared-memory block offset and size must be ints")
        if size != nbytes or size <= 0:
            raise ProtocolError(f"tensor needs {nbytes} bytes, shared-memory block has {size}")
        start, units = off // UNIT, -(-size // UNIT)
        if off % UNIT or start < seg.first_data_unit or start + units > seg.units:
            raise ProtocolError(f"shared-memory block at {off} (+{size}) is outside the segment")
        states = seg.states
        with self._lock:
            if states[start] != SENT:
                raise ProtocolError(f"shared-memory block at {off} was not sent (or already taken)")
            end = start + units
            if (units > 1 and not (states[start + 1 : end] == CONT).all()) or (
                end < seg.units and states[end] == CONT
            ):
                raise ProtocolError(f"shared-memory block at {off} is not {size} bytes long")
            states[start] = CLAIMED
        block = np.frombuffer(seg.mm, np.uint8, size, off)
        weakref.finalize(block, _free, states, start).atexit = False
        return torch.from_numpy(block).view(dtype).view(shape)


def _free(states, start: int) -> None:
    states[start] = FREE


@dataclass
class Link:
    """One side's view of a controller <-> worker pair: where it writes and where it reads."""

    writer: SegmentWriter
    reader: SegmentReader


_offers = itertools.count()


class Offer:
    """The controller's two new segments for one worker, until the worker has opened them.

    They are named energon-<controller pid>-<serial>-{to,from}-<rank> (visible only in
    /proc/<pid>/maps and /proc/<pid>/fd of the processes using them)."""

    def __init__(self, size: int, rank: int, min_bytes: int = DEFAULT_MIN_BYTES):
        self.fds: list[int] = []
        self.segments: list[Segment] = []
        serial = next(_offers)
        try:
            for direction in ("to", "from"):
                name = f"energon-{os.getpid()}-{serial}-{direction}-{rank}"
                seg, fd = Segment.create(size, name)
                self.segments.append(seg)
                self.fds.append(fd)
        except OSError:
            self.close()
            raise
        self.min_bytes = min_bytes

    def meta(self) -> dict:
        """What the init message carries: {"to_worker": spec, "to_controller": spec}."""
        pid = os.getpid()
        to_w, to_c = (
            SegmentSpec(pid, fd, seg.size, seg.token).to_meta()
            for fd, seg in zip(self.fds, self.segments, strict=True)
        )
        return {"to_worker": to_w, "to_controller": to_c, "min_bytes": self.min_bytes}

    def accepted(self) -> Link:
        """The controller's Link once the worker has opened both segments."""
        self.close()
        to_w, to_c = self.segments
        return Link(SegmentWriter(to_w, self.min_bytes), SegmentReader(to_c))

    def close(self) -> None:
        """Closes the memfds (the mappings stay while used): call once the worker has opened them
        or will never do so."""
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def accept(meta: dict | None) -> Link | None:
    """The worker's Link for the init message's shm offer, or None if it cannot be used here."""
    if not isinstance(meta, dict):
        return None
    to_w, to_c = Segment.open(meta.get("to_worker")), Segment.open(meta.get("to_controller"))
    min_bytes = meta.get("min_bytes")
    if to_w is None or to_c is None or type(min_bytes) is not int:
        return None
    return Link(SegmentWriter(to_c, min_bytes), SegmentReader(to_w))
