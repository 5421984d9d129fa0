"""Token-aware chunking with overlap, using the embedding model's own tokenizer.

A document is cut into windows of at most ``chunk_tokens`` tokens (special tokens excluded),
each starting ``chunk_tokens - overlap_tokens`` tokens after the previous one. Chunks are
slices of the original text (by the tokenizer's character offsets), so a chunk's text, and
therefore its content hash, depends only on the document text and the chunking settings:
editing the end of a long document leaves the hashes of its earlier chunks unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ChunkingConfig:
    """How documents are cut. ``chunk_tokens=None`` means "the model's max sequence length".

    ``overlap_tokens`` must be smaller than ``chunk_tokens``.
    """

    chunk_tokens: int | None = None
    overlap_tokens: int = 32

    def resolved(self, model_max_tokens: int) -> ChunkingConfig:
        """Return a config with ``chunk_tokens`` filled in and validated against the model."""
        size = self.chunk_tokens if self.chunk_tokens is not None else model_max_tokens
        if size < 1 or size > model_max_tokens:
            raise ValueError(
                f"chunk_tokens={size} is not allowed: must be between 1 and the model's "
                f"{model_max_tokens} tokens (max sequence length minus special tokens)"
            )
        if not 0 <= self.overlap_tokens < size:
            raise ValueError(
                f"overlap_tokens={self.overlap_tokens} is not allowed: must be >= 0 and < chunk_tokens={size}"
            )
        return ChunkingConfig(chunk_tokens=size, overlap_tokens=self.overlap_tokens)

    def as_dict(self) -> dict[str, Any]:
        return {"chunk_tokens": self.chunk_tokens, "overlap_tokens": self.overlap_tokens}


@dataclass(frozen=True)
class Chunk:
    """One window of a document: its position, character span and text."""

    index: int
    start: int
    end: int
    text: str
    n_tokens: int


def chunk_text(tokenizer: Any, text: str, config: ChunkingConfig) -> list[Chunk]:
    """Cut ``text`` into overlapping token windows; returns [] for blank text.

    ``tokenizer`` is a Hugging Face *fast* tokenizer (it must return offset mappings);
    ``config`` must be resolved (``chunk_tokens`` set). Pure function.
    """
    size, overlap = config.chunk_tokens, config.overlap_tokens
    if size is None:
        raise ValueError("chunk_text needs a resolved ChunkingConfig (chunk_tokens set)")
    # verbose=False: long documents are expected here; they are cut below, not truncated.
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=False,
                    verbose=False)
    offsets = enc["offset_mapping"]
    if not offsets:
        return []
    if len(offsets) <= size:
        # The whole document fits: keep its exact text (including surrounding whitespace).
        return [Chunk(0, 0, len(text), text, len(offsets))]
    step = size - overlap
    chunks: list[Chunk] = []
    first = 0
    while True:
        last = min(first + size, len(offsets)) - 1
        start, end = offsets[first][0], offsets[last][1]
        chunks.append(Chunk(len(chunks), start, end, text[start:end], last - first + 1))
        if last == len(offsets) - 1:
            return chunks
        first += step
