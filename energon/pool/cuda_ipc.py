"""CUDA IPC through the driver API (libcuda, via ctypes): allocate, export, open, close, free.

Why not torch's own CUDA IPC (`storage._share_cuda_()` / `_new_shared_cuda`)? Its allocations come
from the caching allocator (a handle names the whole cached segment, and freed memory stays
cached), and it keeps a lent block alive until every borrower has decremented a reference
counter in a shared file — a borrower that is SIGKILLed never does, so the lender would leak the
block forever. A pool lease wants the opposite: one exact `cuMemAlloc` per lease, freed by the
lender the moment the pool says so, visible at once in the device's free-memory counter
(`torch.cuda.mem_get_info`).

A mapped region becomes a torch tensor through `__cuda_array_interface__` (no copy); the tensor
keeps its `CudaMapping` alive, and `close()` unmaps it (the pool calls it before the lender frees).
Every call here runs on the worker's sync thread with the device's primary context (the one the
CUDA runtime, hence torch, uses) pushed for the duration of the call.
"""

from __future__ import annotations

import ctypes
import threading

CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1
IPC_HANDLE_BYTES = 64

_lib = None
_lock = threading.Lock()
_contexts: dict[int, ctypes.c_void_p] = {}


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * IPC_HANDLE_BYTES)]


def _driver():
    global _lib
    if _lib is None:
        lib = ctypes.CDLL("libcuda.so.1")
        u64, p = ctypes.c_uint64, ctypes.POINTER
        signatures = {
            "cuInit": [ctypes.c_uint],
            "cuGetErrorName": [ctypes.c_int, p(ctypes.c_char_p)],
            "cuDeviceGet": [p(ctypes.c_int), ctypes.c_int],
            "cuDevicePrimaryCtxRetain": [p(ctypes.c_void_p), ctypes.c_int],
            "cuCtxPushCurrent_v2": [ctypes.c_void_p],
            "cuCtxPopCurrent_v2": [p(ctypes.c_void_p)],
            "cuCtxSynchronize": [],
            "cuMemAlloc_v2": [p(u64), ctypes.c_size_t],
            "cuMemFree_v2": [u64],
            "cuIpcGetMemHandle": [p(_IpcHandle), u64],
            "cuIpcOpenMemHandle_v2": [p(u64), _IpcHandle, ctypes.c_uint],
            "cuIpcCloseMemHandle": [u64],
        }
        for name, argtypes in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
        _check(lib.cuInit(0), "cuInit")
        _lib = lib
    return _lib


def _check(code: int, what: str) -> None:
    if code != 0:
        name = ctypes.c_char_p()
        if _lib is not None:
            _lib.cuGetErrorName(code, ctypes.byref(name))
        label = name.value.decode() if name.value else f"error {code}"
        raise RuntimeError(f"{what} failed: {label}")


class _OnDevice:
    """Pushes `device`'s primary context for the duration of a `with` block."""

    def __init__(self, device: int):
        self.device = device

    def __enter__(self):
        lib = _driver()
        with _lock:
            ctx = _contexts.get(self.device)
            if ctx is None:
                dev = ctypes.c_int()
                _check(lib.cuDeviceGet(ctypes.byref(dev), self.device), "cuDeviceGet")
                ctx = ctypes.c_void_p()
                _check(
                    lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain"
                )
                _contexts[self.device] = ctx
        _check(lib.cuCtxPushCurrent_v2(ctx), "cuCtxPushCurrent")
        return lib

    def __exit__(self, *exc_info):
        popped = ctypes.c_void_p()
        _driver().cuCtxPopCurrent_v2(ctypes.byref(popped))


def _as_tensor(owner, ptr: int, nbytes: int, device: int):
    import torch

    class _View:  # what torch.as_tensor reads; the tensor holds it, it holds the owner
        __cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "version": 2,
        }

        def __init__(self, keep):
            self.keep = keep

    tensor = torch.as_tensor(_View(owner), device=torch.device("cuda", device))
    if tensor.data_ptr() != ptr:  # torch placed the pointer on another device and copied it
        raise RuntimeError(f"CUDA memory at {ptr:#x} is not on cuda:{device}")
    return tensor


class CudaAllocation:
    """`nbytes` of device memory from cuMemAlloc on `device`, exportable by IPC."""

    def __init__(self, device: int, nbytes: int):
        self.device, self.nbytes = device, nbytes
        ptr = ctypes.c_uint64()
        with _OnDevice(device) as lib:
            _check(lib.cuMemAlloc_v2(ctypes.byref(ptr), nbytes), "cuMemAlloc")
        self.ptr = ptr.value

    def ipc_handle(self) -> bytes:
        """The 64-byte handle another process opens with CudaMapping."""
        handle = _IpcHandle()
        with _OnDevice(self.device) as lib:
            _check(lib.cuIpcGetMemHandle(ctypes.byref(handle), self.ptr), "cuIpcGetMemHandle")
        # not handle.reserved: a c_char array reads back only up to its first NUL byte
        return ctypes.string_at(ctypes.addressof(handle), IPC_HANDLE_BYTES)

    def tensor(self):
        """A uint8 tensor [nbytes] over this allocation (valid until free())."""
        return _as_tensor(self, self.ptr, self.nbytes, self.device)

    def free(self) -> None:
        """Returns the memory to the device now. Idempotent."""
        if self.ptr:
            with _OnDevice(self.device) as lib:
                lib.cuCtxSynchronize()  # no copy may still read it
                _check(lib.cuMemFree_v2(self.ptr), "cuMemFree")
            self.ptr = 0


class CudaMapping:
    """Another process's CudaAllocation, opened in this process (peer access enabled lazily)."""

    def __init__(self, device: int, handle: bytes, nbytes: int):
        if len(handle) != IPC_HANDLE_BYTES:
            raise ValueError(f"a CUDA IPC handle has {IPC_HANDLE_BYTES} bytes (got {len(handle)})")
        self.device, self.nbytes = device, nbytes
        raw = _IpcHandle()
        ctypes.memmove(ctypes.addressof(raw), handle, IPC_HANDLE_BYTES)
        ptr = ctypes.c_uint64()
        with _OnDevice(device) as lib:
            _check(
                lib.cuIpcOpenMemHandle_v2(
                    ctypes.byref(ptr), raw, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS
                ),
                "cuIpcOpenMemHandle",
            )
        self.ptr = ptr.value

    def tensor(self):
        """A uint8 tensor [nbytes] over the mapped memory (valid until close())."""
        return _as_tensor(self, self.ptr, self.nbytes, self.device)

    def close(self) -> None:
        """Unmaps (after the device finished every copy from it). Idempotent."""
        if self.ptr:
            with _OnDevice(self.device) as lib:
                lib.cuCtxSynchronize()
                _check(lib.cuIpcCloseMemHandle(self.ptr), "cuIpcCloseMemHandle")
            self.ptr = 0
