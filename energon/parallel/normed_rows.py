"""A norm's output that the next GEMV makes itself: the fused all-reduce + norm moved into it.

At tp > 1 the rows a row-parallel GEMV pushed (energon/parallel/partial_sum.py) are summed,
added to the residual and normalised by one kernel (energon/kernels/one_shot_norm.py), and the
next layer's column-parallel GEMV then reads them: two kernels, and between them the fused
kernel's stores, its end and the GEMV's read of x. Where that GEMV is the Gluon one
(energon/kernels/gemv_tma.py, `rows`) every program of it does the sum and the norm itself,
from the pushed slots, right after its wait, and keeps x in shared memory: one kernel
boundary less per all-reduce, two a decoder layer.

So a norm's `add_norm` of pushed rows returns (`NormedRows`, summed) instead of two tensors:
`summed` is allocated and written by whichever kernel takes the rows (program 0 of the GEMV,
or the fused kernel), and `NormedRows` is the normed rows not computed yet. A column-parallel
linear given it (`linear`) runs the GEMV that makes them; anything else that touches it
(`tensor()`, a torch function, an attribute) gets the fused kernel's rows first, once. Until
one of them happened `summed` holds nothing: the models use it only at the next norm, after
the linears that read the normed rows (and the group flushes a pending one before any other
call of its own: `OneShotAllReduce.flush`).
"""

from __future__ import annotations

import torch

from energon.kernels.gemv import normed_linear


class NormedRows:
    """The normed rows [rows, width] of one fused all-reduce + norm call (`rows`, a
    one_shot_norm.Rows whose `normed` and `summed` receive them) of the group's `fast`
    all-reduce, made by the first GEMV that reads them or else by the fused kernel."""

    __slots__ = ("fast", "rows", "made")

    def __init__(self, fast, rows):
        self.fast, self.rows, self.made = fast, rows, False

    @property
    def shape(self) -> torch.Size:
        return self.rows.normed.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.rows.normed.dtype

    @property
    def device(self) -> torch.device:
        return self.rows.normed.device

    def dim(self) -> int:
        return self.rows.normed.dim()

    def size(self, dim: int | None = None):
        return self.rows.normed.size() if dim is None else self.rows.normed.size(dim)

    def tensor(self) -> torch.Tensor:
        """The normed rows, made by the fused kernel if no GEMV made them."""
        if not self.made:
            self.made = True
            self.fast.sum_pushed_rows(self.rows)
        return self.rows.normed

    def linear(self, weight, bias=None, relu: bool = False) -> torch.Tensor:
        """(the rows) @ weight.T (+ bias) (then ReLU): by the GEMV that makes the rows, when it
        takes the call and they are not made yet; else on the rows."""
        if not self.made:
            y = normed_linear(self.rows.normed, weight, bias, relu, self.rows)
            if y is not None:
                self.made = True
                self.fast.rows_read_by_gemv(self)
                return y
        from energon.kernels.gemv import linear

        return linear(self.tensor(), weight, bias, relu, early_weights=True)

    def __getattr__(self, name):
        return getattr(self.tensor(), name)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        def real(a):
            if isinstance(a, NormedRows):
                return a.tensor()
            if isinstance(a, (list, tuple)):
                return type(a)(real(b) for b in a)
            return a

        return func(*real(args), **{k: real(v) for k, v in (kwargs or {}).items()})

    def __repr__(self) -> str:
        return f"NormedRows({tuple(self.shape)}, {self.dtype}, made={self.made})"


def as_tensor(x):
    """`x` as a tensor: NormedRows' rows, anything else itself."""
    return x.tensor() if isinstance(x, NormedRows) else x
