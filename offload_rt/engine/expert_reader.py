"""``ExpertReader``: one expert's three matrices from the checkpoint into a packed slot.

With ``direct`` (the default: ``drop_page_cache``) the reads bypass the page cache: ``O_DIRECT``
straight into a slot placed at the expert's byte phase (``engine/placement``), so the disk
DMAs into the cache and no core copies anything; see ``direct_io``. Without it the page
cache serves repeated reads (the "warm" mode). A matrix whose file dtype differs from the
compute dtype is read and converted.
"""

from __future__ import annotations

import torch

from cache_policies import ExpertKey
from offload_rt.checkpoint import Checkpoint


class ExpertReader:
    """Callable ``reader(key, out)`` the engine fills slots with; ``nbytes(key)`` says how many
    bytes a read takes from the file. Where ``out`` sits is the engine's decision
    (``placement``): the disk writes straight into it when ``out`` is placed at the expert's
    file phase, and ``direct_matrices`` counts the matrices that did."""

    def __init__(self, ckpt: Checkpoint, *, direct: bool) -> None:
        self.ckpt, self.direct = ckpt, direct
        self.direct_matrices = 0  # matrices whose body the disk wrote by O_DIRECT (statistics)

    def nbytes(self, key: ExpertKey) -> int:
        """Bytes of ``key`` in its file (what a read takes from disk)."""
        return self.ckpt.expert(key.layer, key.expert).nbytes

    def __call__(self, key: ExpertKey, out: torch.Tensor) -> None:
        self.direct_matrices += self.ckpt.read_expert_into(key.layer, key.expert, out,
                                                           drop_page_cache=self.direct)
