"""pretrain_gpt.py with a count of module forward calls by class, printed at exit.

``emulated_cuda.py THIS.py <pretrain_gpt flags>`` prints ``forward calls: {class: count}``
on stderr when the run ends: activation recomputation shows as a second forward of the
recomputed modules in every backward.
"""

import atexit
import sys
from collections import Counter

import torch

import pretrain_gpt

calls: Counter = Counter()


def _count(module: torch.nn.Module, args: tuple, output: object) -> None:
    calls[type(module).__name__] += 1


torch.nn.modules.module.register_module_forward_hook(_count)
atexit.register(lambda: print(f"forward calls: {dict(calls)}", file=sys.stderr, flush=True))

if __name__ == "__main__":
    sys.exit(pretrain_gpt.main(sys.argv[1:] + ["--device", "cuda"]))
