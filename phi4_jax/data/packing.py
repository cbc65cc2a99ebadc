"""Documents to fixed-length training rows: tokenize, pair for next-token prediction, pack.

A document `d = encode(text) + [<|endoftext|>]` becomes the pair `inputs = d[:-1]`,
`targets = d[1:]`, so each token after the first is a target exactly once and `<|endoftext|>`
is the target that ends a document. Pairs are packed by grain's `ConcatThenSplitIterDataset`:
pairs are laid end to end and cut every `seq_len` tokens, so a long document continues in the
next row and no token is dropped or repeated. Each piece of a document in a row is a segment
(`segment_ids` 1, 2, ... in the row, 0 on padding) with `positions` counting from 0 within
it, so attention masked by segment never crosses documents. A piece continued from the
previous row starts again at position 0. Rows are full except the last row of a finite stream.

No row holds more than `max_segments` documents (`data.max_segments_per_row`): cuDNN's
packed attention compiles that many segment slots in. A packed row of more is split, whole
segments in order, into rows of at most `max_segments`, each padded; so a run of very short
documents costs padding, never a token or the bound. Its iterator state is grain's: it
resumes exactly.

Long-document sources (mid-training) are packed by `pack_whole_documents` instead: a document
is never cut at a row boundary unless it is longer than a row, so its first token and its
last share one row and the model trains on the whole span; longer ones are cut into row-length
pieces (each a segment from position 0) and the pieces packed first-fit, like short documents.
"""

from __future__ import annotations

import math

import grain
import numpy as np

from phi4_jax.data.tokenizer import Phi4Tokenizer

ROW_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
WHOLE_PACKING_BINS = 4  # first-fit bins open at once for long documents


def document_pair(text: str, tokenizer: Phi4Tokenizer) -> dict[str, np.ndarray]:
    """The next-token pair (int32 `inputs`, `targets`) of one document ended by `<|endoftext|>`."""
    tokens = np.asarray([*tokenizer.encode(text), tokenizer.eot_id], dtype=np.int32)
    return {"inputs": tokens[:-1], "targets": tokens[1:]}


def has_tokens(pair: dict[str, np.ndarray]) -> bool:
    """False for an empty document, which has no target to train on."""
    return len(pair["inputs"]) > 0


def pack_pairs(pairs: grain.IterDataset, seq_len: int, max_segments: int) -> grain.IterDataset:
    """Rows of `seq_len` tokens (the `ROW_KEYS` arrays) packed from a stream of non-empty pairs,
    each holding at most `max_segments` documents."""
    if seq_len < 1:
        raise ValueError(f"seq_len is {seq_len}; rows need at least one token")
    if max_segments < 1:
        raise ValueError(f"data.max_segments_per_row is {max_segments}; give an integer >= 1")
    packed = grain.experimental.ConcatThenSplitIterDataset(
        pairs, length_struct={"inputs": seq_len, "targets": seq_len}
    )
    return grain.experimental.FlatMapIterDataset(packed.map(training_row),
                                                 _SegmentCap(seq_len, max_segments))


def pack_whole_documents(pairs: grain.IterDataset, seq_len: int, max_segments: int
                         ) -> grain.IterDataset:
    """Rows of `seq_len` tokens holding whole documents first-fit (a document longer than a row
    in row-length pieces), at most `max_segments` per row; padding is segment 0."""
    pieces = grain.experimental.FlatMapIterDataset(pairs, _RowPieces(seq_len))
    packed = grain.experimental.FirstFitPackIterDataset(
        pieces, length_struct={"inputs": seq_len, "targets": seq_len},
        num_packing_bins=WHOLE_PACKING_BINS, shuffle_bins=False, max_sequences_per_bin=max_segments)
    return packed.map(training_row)


class _RowPieces(grain.experimental.FlatMapTransform):
    """A pair cut into consecutive pieces of at most `seq_len` tokens."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.max_fan_out = 1  # unused by iterator flat maps: a piece count has no bound

    def flat_map(self, pair: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        return [{key: value[start:start + self.seq_len] for key, value in pair.items()}
                for start in range(0, len(pair["inputs"]), self.seq_len)]


class _SegmentCap(grain.experimental.FlatMapTransform):
    """Splits a row of more than `max_segments` segments (see `split_by_segments`)."""

    def __init__(self, seq_len: int, max_segments: int):
        self.max_segments = max_segments
        self.max_fan_out = math.ceil(seq_len / max_segments)

    def flat_map(self, row: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        return split_by_segments(row, self.max_segments)


def split_by_segments(row: dict[str, np.ndarray], max_segments: int) -> list[dict[str, np.ndarray]]:
    """The row itself if it holds at most `max_segments` segments, else rows of its segments
    `max_segments` at a time, in order, renumbered from 1 and zero-padded to the same length."""
    segment_ids = row["segment_ids"]
    count = int(segment_ids.max())
    if count <= max_segments:
        return [row]
    rows = []
    for first in range(1, count + 1, max_segments):
        taken = np.nonzero((segment_ids >= first) & (segment_ids < first + max_segments))[0]
        piece = {key: np.zeros_like(values) for key, values in row.items()}
        for key, values in row.items():
            piece[key][:len(taken)] = values[taken]
        piece["segment_ids"][:len(taken)] -= first - 1
        rows.append(piece)
    return rows


def training_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A packed element in the trainer's names; inputs and targets share segments and positions.

    The loss covers every real token, or only those a packed `loss_mask` marks (chat data).
    Packed per-token `adapter_ids` (chat data under LoRA, never mixed in a row) become the
    row's one id, its first token's.
    """
    segment_ids = packed["inputs_segment_ids"]
    loss_mask = (segment_ids > 0).astype(np.float32)
    if "loss_mask" in packed:
        loss_mask *= packed["loss_mask"]
    row = {
        "inputs": packed["inputs"],
        "targets": packed["targets"],
        "segment_ids": segment_ids,
        "positions": packed["inputs_positions"],
        "loss_mask": loss_mask,
    }
    if "adapter_ids" in packed:
        row["adapter_ids"] = packed["adapter_ids"][0]
    return row
