"""gpt-oss (``model_type: gpt_oss``): recognised and refused, naming what it needs.

transformers' ``models/gpt_oss/modeling_gpt_oss.py`` has what no family here implements:
attention sinks (a learned per-head logit in every softmax), sliding-window attention on
alternate layers (``layer_types``), biases on the router and on every expert matrix, a clamped
SwiGLU (``swiglu_limit``, ``alpha``) over interleaved gate/up rows, and experts shipped as
MXFP4 blocks with scales (``*_blocks``/``*_scales`` tensors).
"""

from __future__ import annotations

MISSING = ("attention sinks, sliding-window attention on alternate layers (layer_types), "
           "router and expert biases, the clamped SwiGLU activation (swiglu_limit) and MXFP4 "
           "expert weights")
