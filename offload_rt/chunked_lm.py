"""The generation loop's view of the model (``generation.CausalLM``): chunked prefill, last
logits only, ids that must never be sampled masked; and the decoder of a tokenizer-less model."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from offload_rt.model.transformer import Transformer


class ChunkedLM:
    """The generation loop's model: prefill in chunks (bounded work memory), last logits only.

    Ids in ``never_sampled`` get logit -inf (``Runtime._never_sampled``: ids with no text).
    """

    def __init__(self, model: Transformer, chunk: int, never_sampled: Sequence[int]) -> None:
        self.model, self.chunk = model, chunk
        self.max_seq_len = model.max_seq_len
        self.dtype = model.embed.weight.dtype  # the compute dtype, named by NumericalError
        self._never_sampled = torch.tensor(list(never_sampled), dtype=torch.long,
                                           device=model.embed.weight.device) \
            if never_sampled else None

    def reset(self) -> None:
        self.model.reset()

    def forward(self, token_ids: torch.Tensor, start_pos: int) -> torch.Tensor:
        logits = None
        for i in range(0, token_ids.shape[0], self.chunk):
            logits = self.model(token_ids[i:i + self.chunk], start_pos + i, last_only=True)
        assert logits is not None
        if self._never_sampled is not None:
            logits = logits.index_fill(-1, self._never_sampled, float("-inf"))
        return logits


class IdDecoder:
    """Stands in for a tokenizer-less model: text is empty, ids are still returned."""

    def push(self, token_id: int) -> str:
        return ""

    def flush(self) -> str:
        return ""
