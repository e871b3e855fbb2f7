"""Real `tokenizer.json` files made at test time, and model folders' tokenizer files around them.

- `byte_level_bpe()`: a byte-level BPE trained with the `tokenizers` trainer, shaped like
  Qwen2/Qwen3's (ByteLevel pre-tokenizer and decoder, ChatML special tokens, `<think>` as a
  non-special added token, no BOS).
- `sentencepiece_style_bpe()`: a BPE trained with the same trainer on Metaspace words, then given
  SentencePiece's layout: `<unk> <s> </s>` at ids 0-2, the 256 `<0xNN>` byte-fallback pieces
  at 3-258, Llama's legacy normalizer and decoder, BOS added by the post_processor.
- `mixtral_tokenizer_json()`: the real Mixtral v1 SentencePiece model converted to tokenizer.json
  as HF Mixtral folders ship it (same layout, merges ranked by piece score).
`write_tokenizer_folder` writes tokenizer.json + tokenizer_config.json (as transformers'
`save_pretrained` writes it) into a folder; the oracle is transformers' PreTrainedTokenizerFast
on that folder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sentencepiece import SentencePieceProcessor
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "The capital of France is Paris. Tokyo is the capital of Japan.",
    "東京は日本の首都です。中文测试：你好，世界。",
    "Emoji: 😀🚀👩‍👩‍👧 and ✨ — naïve façade, crème brûlée.",
    "line one\nline two\ttabbed   spaces",
    "def add(a, b):\n    return a + b\n",
] * 4
CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
THINK_TOKENS = ("<think>", "</think>")
SP_SPECIALS = ("<unk>", "<s>", "</s>")


def byte_level_bpe(vocab_size: int = 400) -> Tokenizer:
    """Qwen-style byte-level BPE: specials at ids 0-2, `<think>`/`</think>` added last."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(CHATML_SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(CORPUS, trainer=trainer)
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return tk


def _llama_layout(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    """SentencePiece-converted tokenizer.json as HF Mixtral/Llama folders ship it (legacy)."""
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True,
                              byte_fallback=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                          normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                    decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SP_SPECIALS])
    return tk


def sentencepiece_style_bpe(vocab_size: int = 300) -> Tokenizer:
    """A small trained BPE in SentencePiece's layout with byte fallback."""
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False)
    trained.train_from_iterator(CORPUS[:2] + CORPUS[4:6], trainer=trainer)  # Latin text only
    model = json.loads(trained.to_str())["model"]
    pieces = [*SP_SPECIALS, *(f"<0x{b:02X}>" for b in range(256))]
    pieces += [p for p, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return _llama_layout({p: i for i, p in enumerate(pieces)}, merges)  # type: ignore[arg-type]


def mixtral_tokenizer_json(sp_model: Path) -> Tokenizer:
    """The SentencePiece model `sp_model` converted as transformers 4.x converted Mixtral's:
    same ids; merges of normal pieces ranked by the merged piece's score."""
    sp = SentencePieceProcessor(model_file=str(sp_model))
    n = sp.vocab_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    normal = {sp.id_to_piece(i): i for i in range(n)
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))}
    ranked = []
    for piece, piece_id in normal.items():
        for split in range(1, len(piece)):
            left, right = piece[:split], piece[split:]
            if left in normal and right in normal:
                ranked.append((-sp.get_score(piece_id), piece_id, vocab[left], left, right))
    merges = [(left, right) for *_, left, right in sorted(ranked)]
    return _llama_layout(vocab, merges)


def _added_tokens_decoder(tk: Tokenizer) -> dict[str, dict[str, Any]]:
    return {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                     "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
            for i, t in sorted(tk.get_added_tokens_decoder().items())}


def write_tokenizer_folder(folder: Path, tk: Tokenizer, *, special: Mapping[str, Any],
                           chat_template: Any = None, **config: Any) -> Path:
    """tokenizer.json + tokenizer_config.json in `folder` (made if needed). `special`: the
    named tokens (`{"bos_token": None, "eos_token": "<|im_end|>"}`); `chat_template`: a
    string or the named-templates list, None to write none; `config`: more fields."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    data: dict[str, Any] = {"added_tokens_decoder": _added_tokens_decoder(tk),
                            "clean_up_tokenization_spaces": False,
                            "model_max_length": 32768, "split_special_tokens": False,
                            "tokenizer_class": "PreTrainedTokenizerFast", **special, **config}
    if chat_template is not None:
        data["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(data, indent=2,
                                                             ensure_ascii=False) + "\n")
    return folder


QWEN_SPECIAL = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                "unk_token": None}
MIXTRAL_SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
