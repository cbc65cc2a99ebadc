"""Phi-4's and Phi-4-mini's tokenizers: tiktoken's cl100k_base / o200k_base ranks, each
release's special tokens at their released ids, and each release's chat template; and
`bytes`, a 512-row vocabulary for the `toy` model size (tests, CPU experiments).

`bytes` is the 256 byte values as tokens (no merges: ids are the UTF-8 bytes of the text),
then Phi-4's ChatML specials and a pad token, then `<|dummy_k|>` up to 512 ids, and Phi-4's
chat format. A model with it spends 32K parameters per d_model=64 on its vocabulary, not
Phi-4's 6.4M, so a toy training step takes milliseconds on a CPU.

The rank files ship inside the package and are checked against `assets/SHA256SUMS` when
loaded, so a tokenizer never touches the network and a damaged install fails loudly.
Ordinary text, chat contents included, is always encoded as plain text: a literal
`<|im_end|>` or `<|end|>` in a web page is spelled out in ordinary tokens and cannot forge
a turn.

Chat templates (from each release's tokenizer_config.json):
- phi4: `<|im_start|>{role}<|im_sep|>{content}<|im_end|>` per message (the role as text),
  generation prompt `<|im_start|>assistant<|im_sep|>`;
- phi4-mini: `<|{role}|>{content}<|end|>` per message (the role one special token; a system
  message with `tools` puts `<|tool|>{tools}<|/tool|>` after its content), generation
  prompt `<|assistant|>`, and a finished chat (no generation prompt) ends with
  `<|endoftext|>`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import types
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import tiktoken
from tiktoken.load import load_tiktoken_bpe

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"

# The pre-tokenization regexes tiktoken publishes for cl100k_base and o200k_base.
CL100K_PAT_STR = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
O200K_PAT_STR = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

# Without merges the split changes no id; this one keeps every piece short and covers all text.
BYTES_PAT_STR = r"""\S{1,64}|\s{1,64}"""

PHI4_VOCAB_SIZE = 100352
PHI4_MINI_VOCAB_SIZE = 200064  # o200k's ids padded by the model's embedding table.
BYTES_VOCAB_SIZE = 512  # 256 bytes, the specials and dummies; a multiple of 128
CHAT_ROLES = ("system", "user", "assistant")

_PHI4_NAMED_SPECIALS = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|im_start|>": 100264,
    "<|im_end|>": 100265,
    "<|im_sep|>": 100266,
    "<|endofprompt|>": 100276,
}


_BYTES_NAMED_SPECIALS = {
    "<|endoftext|>": 256,
    "<|im_start|>": 257,
    "<|im_end|>": 258,
    "<|im_sep|>": 259,
    "<|pad|>": 260,
}


def _with_dummies(named: Mapping[str, int], first_free: int, vocab_size: int) -> dict[str, int]:
    """Named specials plus `<|dummy_k|>` filling, in order, every id from `first_free` on that
    they leave free, so every id of the model's vocabulary decodes."""
    named_ids = set(named.values())
    free_ids = [i for i in range(first_free, vocab_size) if i not in named_ids]
    dummies = {f"<|dummy_{k}|>": token_id for k, token_id in enumerate(free_ids)}
    return {**named, **dummies}


PHI4_SPECIAL_TOKENS: dict[str, int] = _with_dummies(_PHI4_NAMED_SPECIALS, 100256, PHI4_VOCAB_SIZE)
BYTES_SPECIAL_TOKENS: dict[str, int] = _with_dummies(_BYTES_NAMED_SPECIALS, 256, BYTES_VOCAB_SIZE)
# o200k_base's two specials, then microsoft/Phi-4-mini-instruct's added tokens (its
# added_tokens.json / tokenizer_config.json); ids 200029..200063 only pad the embedding.
PHI4_MINI_SPECIAL_TOKENS: dict[str, int] = {
    "<|endoftext|>": 199999,
    "<|endofprompt|>": 200018,
    "<|assistant|>": 200019,
    "<|end|>": 200020,
    "<|user|>": 200021,
    "<|system|>": 200022,
    "<|tool|>": 200023,
    "<|/tool|>": 200024,
    "<|tool_call|>": 200025,
    "<|/tool_call|>": 200026,
    "<|tool_response|>": 200027,
    "<|tag|>": 200028,
}


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """How a release lays out a chat: each message is `header(role) + content + turn_end`.

    `role_tokens`: the header is the one special token `<|{role}|>` (Phi-4-mini); else
    `<|im_start|>`, the role as text, `<|im_sep|>` (Phi-4). `eos_after_chat`: a finished
    chat (no generation prompt) ends with `<|endoftext|>`.
    """

    role_tokens: bool
    turn_end: str
    eos_after_chat: bool


PHI4_CHAT = ChatFormat(role_tokens=False, turn_end="<|im_end|>", eos_after_chat=False)
PHI4_MINI_CHAT = ChatFormat(role_tokens=True, turn_end="<|end|>", eos_after_chat=True)


@dataclasses.dataclass(frozen=True)
class _TokenizerSpec:
    """What distinguishes one named tokenizer from another (`rank_file` None: byte ranks)."""

    rank_file: str | None
    pat_str: str
    special_tokens: Mapping[str, int]
    vocab_size: int
    pad_token: str
    chat: ChatFormat


_SPECS = {
    "phi4": _TokenizerSpec(
        "cl100k_base.tiktoken", CL100K_PAT_STR, PHI4_SPECIAL_TOKENS, PHI4_VOCAB_SIZE,
        pad_token="<|dummy_85|>", chat=PHI4_CHAT,
    ),
    "phi4-mini": _TokenizerSpec(
        "o200k_base.tiktoken", O200K_PAT_STR, PHI4_MINI_SPECIAL_TOKENS, PHI4_MINI_VOCAB_SIZE,
        pad_token="<|endoftext|>", chat=PHI4_MINI_CHAT,
    ),
    "bytes": _TokenizerSpec(
        None, BYTES_PAT_STR, BYTES_SPECIAL_TOKENS, BYTES_VOCAB_SIZE,
        pad_token="<|pad|>", chat=PHI4_CHAT,
    ),
}
TOKENIZER_NAMES: tuple[str, ...] = tuple(_SPECS)


def vocab_size_of(name: str) -> int:
    """The model vocabulary a named tokenizer needs, without loading its ranks."""
    if name not in _SPECS:
        raise ValueError(f"unknown tokenizer {name!r}; choose one of {sorted(_SPECS)}")
    return _SPECS[name].vocab_size


def tokenizer_for_vocab(vocab_size: int) -> str:
    """The tokenizer a model's embedding is sized for, so `model.size` alone picks it
    (phi-4's 100,352 rows: 'phi4'; Phi-4-mini's 200,064: 'phi4-mini'; toy's 512: 'bytes')."""
    names = [name for name, spec in _SPECS.items() if spec.vocab_size == vocab_size]
    if not names:
        raise ValueError(f"no tokenizer has a vocabulary of {vocab_size} rows; the sizes are "
                         f"{ {name: spec.vocab_size for name, spec in _SPECS.items()} }")
    return names[0]


@dataclasses.dataclass(frozen=True)
class ChatEncoding:
    """Token ids of a ChatML conversation and a 0/1 mask of the ids a model is trained to emit."""

    ids: list[int]
    loss_mask: list[int]

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.loss_mask):
            raise ValueError(f"ChatEncoding: {len(self.ids)} ids but {len(self.loss_mask)} mask entries")


@dataclasses.dataclass(frozen=True)
class Phi4Tokenizer:
    """A tiktoken encoding with a release's ids for the tokens that structure documents and chats.

    `vocab_size` is the model's (padded) embedding size; `end_of_turn_id` ends every chat turn
    (`<|im_end|>`, Phi-4-mini's `<|end|>`); `im_*` ids are None for a tokenizer without
    ChatML specials.
    """

    name: str
    vocab_size: int
    eot_id: int
    pad_id: int
    end_of_turn_id: int
    im_start_id: int | None
    im_end_id: int | None
    im_sep_id: int | None
    chat: ChatFormat = dataclasses.field(repr=False)
    special_tokens: Mapping[str, int] = dataclasses.field(repr=False, compare=False)
    encoding: tiktoken.Encoding = dataclasses.field(repr=False, compare=False)

    def __reduce__(self):
        # By name: a read process (`processes`) loads its own copy from the packaged ranks.
        return load_tokenizer, (self.name,)

    def encode(self, text: str) -> list[int]:
        """Encodes text with special-token strings as ordinary text, so data cannot inject control ids."""
        return self.encoding.encode_ordinary(text)

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` as an int32 array, made without a Python int per token and outside the GIL:
        the input pipeline's hot path, which read threads run side by side."""
        try:
            ids = self.encoding.encode_to_numpy(text, disallowed_special=())
        except UnicodeEncodeError:  # lone surrogates: replaced, as `encode_ordinary` does
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            ids = self.encoding.encode_to_numpy(text, disallowed_special=())
        return ids.view(np.int32)  # ids < 2**31: the same bits

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        """Each text's `encode_array` ids followed by `eot_id`, end to end (int32).

        One tokenizer call for the group: the texts joined by the end-of-text string, the only
        special the call takes, so each text is split and merged on its own, exactly as alone.
        Read threads then let the GIL go once per group rather than once per text (each time
        it goes, another thread may hold it until its switch interval ends). A group where a
        text holds that string itself (or lone surrogates) is encoded text by text, so data
        still cannot inject it.
        """
        end = self._eot_text
        if texts and not any(end in text for text in texts):
            try:
                joined = end.join(texts) + end
                ids = self.encoding.encode_to_numpy(joined, allowed_special={end},
                                                    disallowed_special=())
                return ids.view(np.int32)
            except UnicodeEncodeError:
                pass
        eot = np.array([self.eot_id], np.int32)
        return np.concatenate([part for text in texts for part in (self.encode_array(text), eot)]
                              or [np.zeros(0, np.int32)])

    @functools.cached_property
    def _eot_text(self) -> str:
        return next(text for text, id_ in self.special_tokens.items() if id_ == self.eot_id)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens written as their strings; invalid UTF-8 becomes U+FFFD."""
        token_ids = [int(i) for i in ids]
        try:
            return self.encoding.decode(token_ids)
        except (KeyError, OverflowError) as err:
            raise ValueError(
                f"the {self.name} tokenizer cannot decode ids {self._unknown_ids(token_ids)[:8]}: they are "
                f"neither ranks nor special tokens; ids past {self.encoding.max_token_value} (up to "
                f"{self.vocab_size - 1}) only pad the embedding, mask them out of the logits before sampling"
            ) from err

    def special_id(self, token: str) -> int:
        """Id of a special token such as '<|im_end|>'."""
        if token not in self.special_tokens:
            named = [t for t in self.special_tokens if not t.startswith("<|dummy_")]
            dummies = len(self.special_tokens) - len(named)
            raise KeyError(
                f"{token!r} is not a special token of the {self.name} tokenizer; it has {', '.join(named)}"
                + (f" and <|dummy_0|>..<|dummy_{dummies - 1}|>" if dummies else "")
            )
        return self.special_tokens[token]

    def encode_chat(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False
    ) -> ChatEncoding:
        """The release's chat template (module docstring), no separators between messages.

        The loss mask is 1 on each assistant turn's content and its turn end, 0 elsewhere
        (Phi-4-mini's closing `<|endoftext|>` too: generation stops at `<|end|>`). Keys other
        than 'role' and 'content' are ignored, as the templates ignore them, except a system
        message's `tools` (a string) in Phi-4-mini's.
        """
        ids: list[int] = []
        loss_mask: list[int] = []
        for index, message in enumerate(messages):
            role, content = _checked_message(index, message)
            header = self._role_header(role)
            body = [*self.encode(content), self.end_of_turn_id]
            tools = self._tools(index, message) if role == "system" else []
            ids += header + body[:-1] + tools + body[-1:]
            loss_mask += [0] * (len(header) + len(tools)) + [int(role == "assistant")] * len(body)
        ending = self._role_header("assistant") if add_generation_prompt else (
            [self.eot_id] if self.chat.eos_after_chat else [])
        return ChatEncoding(ids=ids + ending, loss_mask=loss_mask + [0] * len(ending))

    def _role_header(self, role: str) -> list[int]:
        """The tokens that open a turn of `role`."""
        if self.chat.role_tokens:
            return [self.special_tokens[f"<|{role}|>"]]
        return [self.im_start_id, *self.encode(role), self.im_sep_id]

    def _tools(self, index: int, message: Mapping[str, str]) -> list[int]:
        """Phi-4-mini's `<|tool|>{tools}<|/tool|>` of a system message (tools as plain text)."""
        tools = message.get("tools")
        if tools is None or not self.chat.role_tokens:
            return []
        if not isinstance(tools, str):
            raise TypeError(f"chat message {index} has tools of type {type(tools).__name__}; "
                            "expected the tool list as a JSON string")
        return [self.special_tokens["<|tool|>"], *self.encode(tools),
                self.special_tokens["<|/tool|>"]]

    def _unknown_ids(self, token_ids: list[int]) -> list[int]:
        """The ids among `token_ids` that tiktoken cannot decode."""
        unknown = []
        for token_id in token_ids:
            try:
                self.encoding.decode_single_token_bytes(token_id)
            except (KeyError, OverflowError):
                unknown.append(token_id)
        return unknown


def _checked_message(index: int, message: Mapping[str, str]) -> tuple[str, str]:
    """The (role, content) of a chat message, or an error naming the message and what is wrong."""
    if not isinstance(message, Mapping):
        raise TypeError(
            f"chat message {index} is a {type(message).__name__}; "
            "expected a mapping with 'role' and 'content'"
        )
    missing = [key for key in ("role", "content") if key not in message]
    if missing:
        raise ValueError(
            f"chat message {index} lacks {missing}; each message needs 'role' and 'content' "
            f"(got keys {sorted(map(str, message))})"
        )
    role, content = message["role"], message["content"]
    if role not in CHAT_ROLES:
        raise ValueError(f"chat message {index} has role {role!r}; Phi-4's template knows {list(CHAT_ROLES)}")
    if not isinstance(content, str):
        raise TypeError(f"chat message {index} has content of type {type(content).__name__}; expected str")
    return role, content


def _packaged_sha256(filename: str) -> str:
    """The sha256 that `assets/SHA256SUMS` records for a packaged file."""
    for line in (ASSETS_DIR / "SHA256SUMS").read_text(encoding="utf-8").splitlines():
        digest, _, listed = line.strip().partition("  ")
        if listed == filename:
            return digest
    raise ValueError(f"{ASSETS_DIR / 'SHA256SUMS'} has no entry for {filename}; reinstall phi4_jax")


def _load_ranks(path: Path, expected_sha256: str) -> dict[bytes, int]:
    """BPE ranks from a local .tiktoken file, refused unless its sha256 is the expected one."""
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer ranks file {path} is missing; "
            "reinstall phi4_jax (pip install --force-reinstall phi4_jax)"
        )
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected_sha256:
        raise ValueError(
            f"tokenizer ranks file {path} has sha256 {actual}, expected {expected_sha256} "
            f"(assets/SHA256SUMS): the file is corrupted or was replaced; reinstall phi4_jax "
            f"(pip install --force-reinstall phi4_jax, or restore phi4_jax/assets from the repository)"
        )
    return load_tiktoken_bpe(str(path), expected_hash=expected_sha256)


def _build_tokenizer(name: str, spec: _TokenizerSpec, ranks: dict[bytes, int]) -> Phi4Tokenizer:
    """Wraps ranks and a spec's special tokens in a tiktoken encoding."""
    encoding = tiktoken.Encoding(
        name=name, pat_str=spec.pat_str, mergeable_ranks=ranks, special_tokens=dict(spec.special_tokens)
    )
    specials = types.MappingProxyType(dict(spec.special_tokens))
    return Phi4Tokenizer(
        name=name,
        vocab_size=spec.vocab_size,
        eot_id=specials["<|endoftext|>"],
        pad_id=specials[spec.pad_token],
        end_of_turn_id=specials[spec.chat.turn_end],
        im_start_id=specials.get("<|im_start|>"),
        im_end_id=specials.get("<|im_end|>"),
        im_sep_id=specials.get("<|im_sep|>"),
        chat=spec.chat,
        special_tokens=specials,
        encoding=encoding,
    )


def load_tokenizer(name: str = "phi4") -> Phi4Tokenizer:
    """The named tokenizer ('phi4', 'phi4-mini' or 'bytes'), built once per process."""
    if name not in _SPECS:
        raise ValueError(f"unknown tokenizer {name!r}; choose one of {sorted(_SPECS)}")
    return _cached_tokenizer(name)


@functools.cache
def _cached_tokenizer(name: str) -> Phi4Tokenizer:
    """Builds a tokenizer from its packaged, hash-checked rank file (or the byte ranks);
    cached on the name alone."""
    return _build_tokenizer(name, _SPECS[name], mergeable_ranks(name))


def mergeable_ranks(name: str) -> dict[bytes, int]:
    """A named tokenizer's BPE ranks (token bytes -> id, specials excluded), hash-checked: what
    a converter to another library's format needs."""
    spec = _spec(name)
    if spec.rank_file is None:
        return {bytes([value]): value for value in range(256)}
    return _load_ranks(ASSETS_DIR / spec.rank_file, _packaged_sha256(spec.rank_file))


def split_pattern(name: str) -> str:
    """The regex a named tokenizer splits text with before merging."""
    return _spec(name).pat_str


def _spec(name: str):
    if name not in _SPECS:
        raise ValueError(f"unknown tokenizer {name!r}; choose one of {sorted(_SPECS)}")
    return _SPECS[name]
