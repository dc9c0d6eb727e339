"""Count what a forward/backward pass does, op by op, without running it on a GPU.

:class:`OpCensus` is a ``TorchDispatchMode`` that records, for every aten op, how many
tensor elements it reads and writes. Matmul-class ops (matrix products, fused attention)
are compute-bound; view ops move nothing; everything else (pointwise ops, norms,
reductions, copies) is memory-bound and its traffic is what an extra elementwise kernel
costs on a GPU. Under ``FakeTensorMode`` the census of a full-size model takes a
fraction of a second on a CPU, which makes it a stand-in for a kernel profile when
comparing how much elementwise work each method adds (bench/op_census.py).
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

COMPUTE_BOUND_OPS: frozenset[str] = frozenset({
    "mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "convolution",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention_backward", "_scaled_dot_product_flash_attention_for_cpu_backward",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward",
})


def _elements(values: Iterable) -> int:
    return sum(t.numel() for t in tree_leaves(values) if isinstance(t, torch.Tensor) and t.dim() > 0)


def _is_batched_dot(name: str, out) -> bool:
    """A ``bmm`` of 1 x 1 products is a batch of dot products: memory-bound, so it is counted."""
    return name in ("bmm", "baddbmm") and isinstance(out, torch.Tensor) and tuple(out.shape[-2:]) == (1, 1)


class OpCensus(TorchDispatchMode):
    """Per aten op name: elements written (``written``) and read (``read``).

    Only ops that move memory are recorded: compute-bound ops (:data:`COMPUTE_BOUND_OPS`,
    except a ``bmm`` of dot products) go to ``compute_bound`` instead; view ops and ops returning no tensor are skipped.
    0-d tensors (scalars) are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.written: Counter = Counter()
        self.read: Counter = Counter()
        self.compute_bound: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in COMPUTE_BOUND_OPS and not _is_batched_dot(name, out):
            self.compute_bound[name] += 1
        elif not func.is_view and any(isinstance(t, torch.Tensor) for t in tree_leaves(out)):
            self.written[name] += _elements(out)
            self.read[name] += _elements((args, kwargs))
        return out

    def traffic(self) -> int:
        """Elements read plus written by all memory-bound ops."""
        return sum(self.written.values()) + sum(self.read.values())


def census_of(step: Callable[[], torch.Tensor]) -> OpCensus:
    """Census of ``step()`` (which returns a scalar loss) and its backward."""
    with OpCensus() as census:
        step().backward()
    return census
