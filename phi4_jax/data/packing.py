"""Documents to fixed-length training rows: tokenize, pair for next-token prediction, pack.

A document `d = encode(text) + [<|endoftext|>]` becomes the pair `inputs = d[:-1]`,
`targets = d[1:]`, so each token after the first is a target exactly once and `<|endoftext|>`
is the target that ends a document. Documents are read in groups (`group_pairs`: each
encoded straight to an int32 array, the pairs laid end to end with their lengths), so the
per-element cost of the input pipeline is paid once per group, not once per document.
`pack_groups` lays the groups' pairs end to end and cuts them every `seq_len` tokens, so a
long document continues in the next row and no token is dropped or repeated: grain's
`ConcatThenSplitIterDataset` semantics, computed with NumPy over whole rows at once instead
of one Python step per document. Each piece of a document in a row is a segment
(`segment_ids` 1, 2, ... in the row, 0 on padding) with `positions` counting from 0 within
it, so attention masked by segment never crosses documents. A piece continued from the
previous row starts again at position 0. Rows are full except the last row of a finite stream.

No row holds more than `max_segments` documents (`data.max_segments_per_row`): cuDNN's
packed attention compiles that many segment slots in. A packed row of more is split, whole
segments in order, into rows of at most `max_segments`, each padded; so a run of very short
documents costs padding, never a token or the bound. Its iterator state (the parent's state
before the group that holds the next row's first token, the tokens of that group before it,
the split rows of it already returned) resumes exactly, re-reading at most one row's groups.

Long-document sources (mid-training) are packed by `pack_whole_documents` instead: a document
is never cut at a row boundary unless it is longer than a row, so its first token and its
last share one row and the model trains on the whole span; longer ones are cut into row-length
pieces (each a segment from position 0) and the pieces packed first-fit, like short documents.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from phi4_jax.data.tokenizer import Phi4Tokenizer

ROW_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
WHOLE_PACKING_BINS = 4  # first-fit bins open at once for long documents


def document_pair(text: str, tokenizer: Phi4Tokenizer) -> dict[str, np.ndarray]:
    """The next-token pair (int32 `inputs`, `targets`) of one document ended by `<|endoftext|>`."""
    tokens = np.append(tokenizer.encode_array(text), np.int32(tokenizer.eot_id))
    return {"inputs": tokens[:-1], "targets": tokens[1:]}


def has_tokens(pair: dict[str, np.ndarray]) -> bool:
    """False for an empty document, which has no target to train on."""
    return len(pair["inputs"]) > 0


def group_pairs(texts: Sequence[str | None], tokenizer: Phi4Tokenizer) -> dict[str, np.ndarray]:
    """The next-token pairs of a group of documents end to end (int32 `inputs`, `targets`) and
    each pair's length (`lengths`); None (a record the bad-record policy skipped) and empty
    documents, which have no target, are left out."""
    ids = tokenizer.encode_documents([text for text in texts if text])  # each ends in eot
    is_end = ids == tokenizer.eot_id  # ordinary text never encodes to it
    ends = np.flatnonzero(is_end)
    lengths = np.diff(ends, prepend=-1) - 1
    # each document's tokens, and each one's next token: the document's next, then its eot
    return {"inputs": ids[~is_end], "targets": ids[1:][~is_end[:-1]], "lengths": lengths}


def pack_groups(groups: grain.IterDataset, seq_len: int, max_segments: int) -> grain.IterDataset:
    """Rows of `seq_len` tokens (the `ROW_KEYS` arrays) packed from a stream of `group_pairs`
    groups, each row holding at most `max_segments` documents."""
    if seq_len < 1:
        raise ValueError(f"seq_len is {seq_len}; rows need at least one token")
    if max_segments < 1:
        raise ValueError(f"data.max_segments_per_row is {max_segments}; give an integer >= 1")
    return _PackedRows(groups, seq_len, max_segments)


class _PackedRows(grain.IterDataset):
    """Groups of pairs laid end to end and cut into rows (see the module docstring)."""

    def __init__(self, parent: grain.IterDataset, seq_len: int, max_segments: int):
        super().__init__(parent)
        self.seq_len, self.max_segments = seq_len, max_segments

    def __iter__(self) -> grain.DatasetIterator:
        return _PackedRowsIterator(self._parent.__iter__(), self.seq_len, self.max_segments)


_STATE_KEYS = ("parent", "skip_tokens", "skip_rows")


class _PackedRowsIterator(grain.DatasetIterator):
    """Reads groups until a row is full, then cuts every full row of what it read at once.

    `_tokens` holds the read tokens not yet in a returned row ("inputs", "targets" and
    "document", a number that differs between neighbouring documents), `_groups` for each
    group they came from the parent state before it, its tokens in `_tokens` and its tokens
    before those (already returned); `_rows` the rows cut but not yet returned, each with the
    state that resumes after it.
    """

    def __init__(self, parent: grain.DatasetIterator, seq_len: int, max_segments: int):
        super().__init__(parent)
        self._seq_len, self._max_segments = seq_len, max_segments
        self.set_state({"parent": parent.get_state(), "skip_tokens": 0, "skip_rows": 0})

    def __next__(self) -> dict[str, np.ndarray]:
        if not self._rows:
            self._cut_rows()
        row, self._state = self._rows.popleft()
        return row

    def get_state(self) -> dict[str, Any]:
        return self._state

    def set_state(self, state: dict[str, Any]) -> None:
        if set(state) != set(_STATE_KEYS):
            raise ValueError(
                f"a packed-rows state has keys {sorted(state)}, expected {list(_STATE_KEYS)}: it "
                f"was saved by another packer (before grouped reading, grain's ConcatThenSplit); "
                f"resume that run with the code that saved it")
        self._parent.set_state(state["parent"])
        self._state = state
        self._tokens = {key: np.zeros(0, np.int32) for key in ("inputs", "targets")}
        self._tokens["document"] = np.zeros(0, np.int64)
        self._groups = collections.deque()
        self._rows = collections.deque()
        self._first_offset = state["skip_tokens"]  # of the first group read, already returned
        self._skip_rows = state["skip_rows"]

    def _cut_rows(self) -> None:
        """Reads groups until a row is full (or the parent ends), then queues every full row."""
        exhausted = False
        while len(self._tokens["inputs"]) < self._seq_len and not exhausted:
            exhausted = not self._read_group()
        count = len(self._tokens["inputs"]) // self._seq_len
        if count == 0 and len(self._tokens["inputs"]) == 0:
            raise StopIteration
        used = count * self._seq_len if count else len(self._tokens["inputs"])
        rows = _rows_of({key: values[:used] for key, values in self._tokens.items()}, self._seq_len)
        for index, row in enumerate(rows):
            pieces = split_by_segments(row, self._max_segments)
            for piece_index, piece in enumerate(pieces):
                done = piece_index + 1 == len(pieces)
                state = self._state_at((index + done) * self._seq_len, 0 if done else piece_index + 1)
                self._rows.append((piece, state))
        for _ in range(self._skip_rows):
            self._rows.popleft()
        self._skip_rows = 0
        self._tokens = {key: values[used:] for key, values in self._tokens.items()}
        self._forget_groups_before(used)

    def _read_group(self) -> bool:
        """Appends the parent's next group to `_tokens`; False if the parent has ended."""
        before = self._parent.get_state()
        try:
            group = next(self._parent)
        except StopIteration:
            return False
        skip, self._first_offset = self._first_offset, 0
        document = np.repeat(np.arange(len(group["lengths"])), group["lengths"])[skip:]
        if len(self._tokens["document"]):
            document += self._tokens["document"][-1] + 1
        self._tokens = {
            "inputs": np.concatenate([self._tokens["inputs"], group["inputs"][skip:]]),
            "targets": np.concatenate([self._tokens["targets"], group["targets"][skip:]]),
            "document": np.concatenate([self._tokens["document"], document]),
        }
        self._groups.append((before, len(group["inputs"]) - skip, skip))
        return True

    def _state_at(self, token: int, skip_rows: int) -> dict[str, Any]:
        """The state that resumes with the row starting at `token` of `_tokens`."""
        start = 0
        for before, count, skip in self._groups:
            if token < start + count:
                return {"parent": before, "skip_tokens": skip + token - start, "skip_rows": skip_rows}
            start += count
        return {"parent": self._parent.get_state(), "skip_tokens": 0, "skip_rows": skip_rows}

    def _forget_groups_before(self, token: int) -> None:
        """Drops the groups whose tokens all lie before `token`; the first kept one starts
        part-way, so its state entry now skips the tokens already cut."""
        while self._groups and self._groups[0][1] <= token:
            token -= self._groups.popleft()[1]
        if self._groups and token:
            before, count, skip = self._groups[0]
            self._groups[0] = (before, count - token, skip + token)


def _rows_of(tokens: dict[str, np.ndarray], seq_len: int) -> list[dict[str, np.ndarray]]:
    """`tokens` cut into rows of `seq_len` (the last zero-padded), each a `ROW_KEYS` dict: a
    segment is a run of one document within a row, numbered from 1, positions from 0 in it."""
    count = -(-len(tokens["inputs"]) // seq_len)
    padding = count * seq_len - len(tokens["inputs"])
    shaped = {key: np.pad(values, (0, padding)).reshape(count, seq_len)
              for key, values in tokens.items()}
    real = np.arange(count * seq_len).reshape(count, seq_len) < len(tokens["inputs"])
    starts = np.ones((count, seq_len), bool)
    starts[:, 1:] = shaped["document"][:, 1:] != shaped["document"][:, :-1]
    column = np.arange(seq_len, dtype=np.int32)
    segment_ids = (np.cumsum(starts, axis=1, dtype=np.int32) * real).astype(np.int32)
    positions = (column - np.maximum.accumulate(np.where(starts, column, 0), axis=1)) * real
    loss_mask = real.astype(np.float32)
    return [{"inputs": shaped["inputs"][r], "targets": shaped["targets"][r],
             "segment_ids": segment_ids[r], "positions": positions[r].astype(np.int32),
             "loss_mask": loss_mask[r]} for r in range(count)]


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
