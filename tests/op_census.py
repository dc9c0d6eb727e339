"""Count the elementwise work a forward/backward does, op by op (a CPU stand-in for a profile)."""

from __future__ import annotations

from collections import Counter
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class PointwiseCensus(TorchDispatchMode):
    """Records, for every pointwise aten op dispatched, the number of elements it writes.

    ``elements`` is the total; ``by_op`` splits it by op name. Matmuls, reductions,
    views and copies are not pointwise and not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch.Tag.pointwise in func.tags:
            results = out if isinstance(out, (tuple, list)) else (out,)
            self.by_op[func.overloadpacket.__name__] += sum(t.numel() for t in results if isinstance(t, torch.Tensor))
        return out

    @property
    def elements(self) -> int:
        return sum(self.by_op.values())


def pointwise_elements(step: Callable[[], torch.Tensor]) -> PointwiseCensus:
    """Census of ``step()`` (which returns a scalar loss) and its backward."""
    with PointwiseCensus() as census:
        step().backward()
    return census
