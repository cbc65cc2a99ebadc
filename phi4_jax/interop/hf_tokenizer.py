"""phi4_jax's tokenizers as Hugging Face `tokenizers` files, so an exported model loads with
its tokenizer: `tokenizer.json` (byte-level BPE with the same ranks, split regex and special
tokens at the same ids) and `tokenizer_config.json` (the roles' tokens and the release's chat
template, written from the same `ChatFormat` phi4_jax encodes chats with).

The merges are recovered from tiktoken's ranks as transformers' `TikTokenConverter` does: a
token of rank r merges the two lower-ranked tokens that concatenate to it. One difference of
policy: transformers' tokenizer reads special-token strings in text as the special tokens,
where `Phi4Tokenizer.encode` spells them out as ordinary text.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from phi4_jax.data.tokenizer import ChatFormat, Phi4Tokenizer, mergeable_ranks, split_pattern
from phi4_jax.interop import hf_checkpoint as hf

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# The releases' roles: phi-4's and Phi-4-mini's config.json ids. Others: bos the document
# separator, eos the end of a turn.
_RELEASE_TOKEN_IDS = {"phi4": hf.PHI4_TOKEN_IDS, "phi4-mini": hf.PHI4_MINI_TOKEN_IDS}


def token_ids(tokenizer: Phi4Tokenizer) -> hf.SpecialTokenIds:
    """The bos/eos/pad ids a model of this tokenizer writes in config.json."""
    return _RELEASE_TOKEN_IDS.get(tokenizer.name, hf.SpecialTokenIds(
        bos=tokenizer.eot_id, eos=tokenizer.end_of_turn_id, pad=tokenizer.pad_id))


def _byte_level(token: bytes) -> str:
    """A token's bytes in the byte-level alphabet GPT-2-style tokenizers store in vocabularies."""
    return "".join(_BYTE_TO_UNICODE[b] for b in token)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 bytes to printable characters (its `bytes_to_unicode`)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable},
            **{b: chr(256 + k) for k, b in enumerate(others)}}


_BYTE_TO_UNICODE = _bytes_to_unicode()


def _merges(ranks: dict[bytes, int]) -> list[tuple[str, str]]:
    """BPE merges in rank order: each multi-byte token from its two lower-ranked halves."""
    merges = []
    for token, rank in ranks.items():
        halves = [(token[:i], token[i:]) for i in range(1, len(token))
                  if token[:i] in ranks and token[i:] in ranks]
        halves.sort(key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
        merges += [(rank, left, right) for left, right in halves]
    merges.sort(key=lambda merge: merge[0])
    return [(_byte_level(left), _byte_level(right)) for _, left, right in merges]


def hf_tokenizer(tokenizer: Phi4Tokenizer) -> Tokenizer:
    """The `tokenizers` equivalent of a phi4_jax tokenizer: same ids for the same text."""
    ranks = mergeable_ranks(tokenizer.name)
    vocab = {_byte_level(token): rank for token, rank in ranks.items()}
    vocab.update(tokenizer.special_tokens)
    converted = Tokenizer(models.BPE(vocab, _merges(ranks), fuse_unk=False, ignore_merges=True))
    converted.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split_pattern(tokenizer.name)), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    converted.decoder = decoders.ByteLevel()
    converted.add_special_tokens([AddedToken(token, normalized=False, special=True)
                                  for token in tokenizer.special_tokens])
    return converted


def chat_template(chat: ChatFormat) -> str:
    """The Jinja chat template of a release's chat format (`data.tokenizer` docstring)."""
    end = "'" + chat.turn_end + "'"
    if chat.role_tokens:
        body = ("{% if message['role'] == 'system' and message.get('tools') %}"
                "{{ '<|system|>' + message['content'] + '<|tool|>' + message['tools'] + "
                f"'<|/tool|>' + {end} }}}}"
                f"{{% else %}}{{{{ '<|' + message['role'] + '|>' + message['content'] + {end} }}}}"
                "{% endif %}")
        prompt = "'<|assistant|>'"
    else:
        body = ("{{ '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] + "
                f"{end} }}}}")
        prompt = "'<|im_start|>assistant<|im_sep|>'"
    ending = "{% else %}{{ '<|endoftext|>' }}" if chat.eos_after_chat else ""
    return (f"{{% for message in messages %}}{body}{{% endfor %}}"
            f"{{% if add_generation_prompt %}}{{{{ {prompt} }}}}{ending}{{% endif %}}")


def save_hf_tokenizer(tokenizer: Phi4Tokenizer, path: str | Path, *, max_length: int) -> None:
    """Writes tokenizer.json and tokenizer_config.json for `AutoTokenizer.from_pretrained`."""
    path = Path(path)
    names = {token_id: token for token, token_id in tokenizer.special_tokens.items()}
    roles = token_ids(tokenizer)
    hf_tokenizer(tokenizer).save(str(path / TOKENIZER_FILE))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": names[roles.bos],
              "eos_token": names[roles.eos], "pad_token": names[roles.pad], "unk_token": None,
              "add_bos_token": False, "add_eos_token": False, "model_max_length": max_length,
              "clean_up_tokenization_spaces": False, "chat_template": chat_template(tokenizer.chat)}
    (path / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
