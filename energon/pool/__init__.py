"""Peer memory pooling: weights that exceed a worker's GPU live in memory lent by peer GPUs
(CUDA IPC) or pinned host memory, prefetched layer by layer behind compute.

    allocator.py  the pool service in the controller: budgets, leases, lender/borrower deaths
    member.py     the worker side: lend (cuMemAlloc / /dev/shm), map, unmap, reclaim
    cuda_ipc.py   CUDA IPC through the driver API
    messages.py   Offer and Handle, the plain values that travel
    offload.py    which layers are pooled; staging buffers and the side-stream copy schedule
"""
