"""Triton kernels for the small per-layer ops of a decode step, each behind a module that falls
back to the eager torch ops off CUDA or without triton.

norms.py         LayerNorm / RMSNorm modules with `add_norm` (residual add fused into the norm)
norm_kernels.py  their Triton kernel (imported only on CUDA, only when triton is installed)
rope.py          rotary embedding (in place) and SwiGLU's silu(gate) * up for LLaMA-style models
rope_kernels.py  their Triton kernels (imported only on CUDA, only when triton is installed)
one_shot.py      the float16 one-shot all-reduce over NVLink peer memory, bias fused
                 (energon.parallel.allreduce decides when it runs)
"""
