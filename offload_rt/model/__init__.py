"""The resident trunk of an MoE model of any supported family (plain torch): which parts its
blocks have comes from its ``ModelConfig`` (``offload_rt.families``)."""
