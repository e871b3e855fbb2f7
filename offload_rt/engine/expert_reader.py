"""``ExpertReader``: one expert's three matrices from the checkpoint into a packed slot.

With ``direct`` (the default: ``drop_page_cache``) the reads bypass the page cache: ``O_DIRECT``
straight into the slot where the slot was placed at the expert's byte phase (``phase``), so the
disk DMAs into the cache and no core copies anything; see ``direct_io``. Without it the page
cache serves repeated reads (the "warm" mode). A matrix whose file dtype differs from the
compute dtype is read and converted.
"""

from __future__ import annotations

import torch

from cache_policies import ExpertKey
from offload_rt.checkpoint import Checkpoint
from offload_rt.direct_io import ALIGN


class ExpertReader:
    """Callable ``reader(key, out)`` the engine fills slots with; ``phase(key)`` says where in
    an aligned slot ``key``'s buffer should start for the disk to write it directly, and
    ``nbytes(key)`` how many bytes a read takes from the file."""

    def __init__(self, ckpt: Checkpoint, *, direct: bool) -> None:
        self.ckpt, self.direct = ckpt, direct
        self._phases: dict[ExpertKey, int] = {}
        self.direct_matrices = 0  # matrices whose body the disk wrote by O_DIRECT (statistics)

    def phase(self, key: ExpertKey) -> int:
        """Byte offset (< ALIGN) inside an ALIGN-aligned slot at which ``key``'s first matrix
        lands on its file offset's phase. 0 when reads go through the page cache anyway."""
        phase = self._phases.get(key)
        if phase is None:
            first = self.ckpt.expert(key.layer, key.expert).matrices[0]
            item = first.dtype.itemsize
            phase = first.offset % ALIGN if self.direct else 0
            phase = phase if phase % item == 0 else 0
            self._phases[key] = phase
        return phase

    def nbytes(self, key: ExpertKey) -> int:
        """Bytes of ``key`` in its file (what a read takes from disk)."""
        return self.ckpt.expert(key.layer, key.expert).nbytes

    def __call__(self, key: ExpertKey, out: torch.Tensor) -> None:
        self.direct_matrices += self.ckpt.read_expert_into(key.layer, key.expert, out,
                                                           drop_page_cache=self.direct)
