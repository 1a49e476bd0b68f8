#!/usr/bin/env python
"""Parameters and memory per GPU for a Qwen2.5-VL layout: same CLI as ``megatron-vgpo plan-memory``
(see :mod:`megatron_vgpo.checkpoint.plan_memory_cli`)."""

import sys

from megatron_vgpo.checkpoint.plan_memory_cli import main

if __name__ == "__main__":
    sys.exit(main())
