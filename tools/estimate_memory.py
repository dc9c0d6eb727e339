#!/usr/bin/env python
"""Per-GPU memory of a megatron-ext GPT for a config and parallel layout (megatron_ext.memory).

    python tools/estimate_memory.py --config examples/configs/gpt-13b/baseline.yaml --num-gpus 16
"""

import sys

from megatron_ext.memory import main

if __name__ == "__main__":
    sys.exit(main())
