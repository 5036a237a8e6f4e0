"""GPT-J tokenizer: GPT-2 byte-level BPE plus GPT-J's 143 extra tokens (vocabulary 50400).

A thin layer over `tokenizers.Tokenizer`. GPT-J has no padding token: `pad_token_id` is `<|endoftext|>`
(50256), so padded positions are told apart from real end-of-text tokens only by the attention mask
(and by labels -100); never infer padding from the ids.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence, Union

from tokenizers import AddedToken, Encoding, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

ENDOFTEXT = "<|endoftext|>"
NUM_EXTRA_TOKENS = 143
GPT2_VOCAB_SIZE = 50257
GPTJ_VOCAB_SIZE = GPT2_VOCAB_SIZE + NUM_EXTRA_TOKENS  # 50400, the rows of GPT-J's embedding
MODEL_MAX_LENGTH = 2048
BUNDLED_TOKENIZER = Path(__file__).resolve().parent.parent / "assets" / "gpt2-tokenizer.json"

PathLike = Union[str, os.PathLike]


class TokenizerMismatchError(ValueError):
    """The tokenizer produces ids the model's embedding has no row for."""


def _extra_token_names() -> list[str]:
    return [f"<|extratoken_{i}|>" for i in range(1, NUM_EXTRA_TOKENS + 1)]


class GPTJTokenizer:
    """GPT-J's tokenizer. Build it with `from_pretrained`; `backend` is the underlying `tokenizers.Tokenizer`."""

    def __init__(self, backend: Tokenizer):
        self.backend = backend
        # <|endoftext|> must be matched as one special token in text (as transformers does), not split into "<|", ...
        self.backend.add_special_tokens([AddedToken(ENDOFTEXT, special=True, normalized=False)])
        if self.backend.get_vocab_size(with_added_tokens=True) == GPT2_VOCAB_SIZE:
            # Plain GPT-2 vocabulary: append GPT-J's extra tokens so ids 50257..50399 exist, as in GPT-J's own files.
            self.backend.add_tokens([AddedToken(t, normalized=False) for t in _extra_token_names()])
        eos = self.backend.token_to_id(ENDOFTEXT)
        if eos is None:
            raise ValueError(f"The tokenizer has no {ENDOFTEXT} token; a GPT-2/GPT-J BPE tokenizer is required.")
        self._eos_id: int = eos

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, path: PathLike | None = None) -> "GPTJTokenizer":
        """Load from a checkpoint directory, a tokenizer file or a hub id; the bundled GPT-2 BPE when there is none.

        In a directory, `tokenizer.json` is preferred, else `vocab.json` + `merges.txt` (with `added_tokens.json`
        and `special_tokens_map.json` applied, as in EleutherAI's GPT-J files). A directory with neither, or
        `path=None`, gives the bundled tokenizer, which equals GPT-J's. A path that does not exist is tried as a
        hub id (online only).
        """
        if path is None:
            return cls(Tokenizer.from_file(str(BUNDLED_TOKENIZER)))
        local = Path(path)
        if local.is_file():
            return cls(Tokenizer.from_file(str(local)))
        if local.is_dir():
            if (local / "tokenizer.json").is_file():
                return cls(Tokenizer.from_file(str(local / "tokenizer.json")))
            if (local / "vocab.json").is_file() and (local / "merges.txt").is_file():
                return cls(_from_vocab_and_merges(local))
            return cls.from_pretrained(None)
        reason = "it does not look like a hub id (owner/name)"
        if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) and not str(path).startswith("."):
            try:
                return cls(Tokenizer.from_pretrained(str(path)))
            except Exception as error:
                reason = f"loading it as a hub id failed ({type(error).__name__}; offline?)"
        raise FileNotFoundError(
            f"Tokenizer path {str(path)!r} is neither a file nor a directory, and {reason}. Pass a checkpoint "
            "directory, a tokenizer.json file, or nothing to use the bundled GPT-J tokenizer."
        )

    def save_pretrained(self, directory: PathLike) -> list[Path]:
        """Write `tokenizer.json`, `vocab.json`, `merges.txt` and the configs that transformers' AutoTokenizer reads."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        # vocab.json + merges.txt: for readers without `tokenizers` support (transformers' slow GPT2Tokenizer).
        written = [directory / "tokenizer.json"] + [Path(p) for p in self.backend.model.save(str(directory))]
        special = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT, "pad_token": ENDOFTEXT}
        config = {
            "tokenizer_class": "GPT2Tokenizer",
            "model_max_length": MODEL_MAX_LENGTH,
            "add_prefix_space": False,
            "add_bos_token": False,
            "clean_up_tokenization_spaces": False,
            **special,
        }
        for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
            (directory / name).write_text(json.dumps(content, indent=2) + "\n")
            written.append(directory / name)
        return written

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (50400 for GPT-J)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int:
        return self._eos_id

    @property
    def bos_token_id(self) -> int:
        return self._eos_id

    @property
    def pad_token_id(self) -> int:
        """GPT-J has no pad token: padding reuses `<|endoftext|>` and relies on the attention mask."""
        return self._eos_id

    @property
    def fingerprint(self) -> str:
        """Hash of the full tokenizer definition; data caches are keyed on it so a changed tokenizer re-tokenizes.

        Recomputed on each access (a few ms), so it follows changes made through `backend`.
        """
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ encoding and decoding
    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Like transformers' GPT-J tokenizer, it adds no bos/eos even with add_special_tokens."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = False) -> list[list[int]]:
        """Token ids of each text (tokenized in parallel by the Rust backend)."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def encode_with_offsets(self, texts: Sequence[str]) -> list[Encoding]:
        """`tokenizers.Encoding` per text: `.ids` and `.offsets`, (start, end) character spans into the text.

        Byte-level BPE puts a word's leading space inside its token, so " Paris" spans the space too; use
        `trim_offsets` to get the span of the visible characters.
        """
        return self.backend.encode_batch(list(texts), add_special_tokens=False)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; `skip_special_tokens=True` drops `<|endoftext|>` (the extra tokens are ordinary tokens)."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, batch: Iterable[Iterable[int]], *, skip_special_tokens: bool = False) -> list[str]:
        return self.backend.decode_batch([list(ids) for ids in batch], skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ checks
    def check_fits(self, model_vocab_size: int) -> None:
        """Raise when some token id has no row in a model embedding of `model_vocab_size` rows."""
        if self.vocab_size > model_vocab_size:
            raise TokenizerMismatchError(
                f"The tokenizer has {self.vocab_size} tokens but the model's embedding has only {model_vocab_size} "
                f"rows, so ids >= {model_vocab_size} would index past it. Use the tokenizer that belongs to the "
                "checkpoint (its tokenizer files in model.path), or a model config whose vocab_size is at least "
                f"{self.vocab_size} (GPT-J uses {GPTJ_VOCAB_SIZE})."
            )

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"GPTJTokenizer(vocab_size={self.vocab_size}, eos_token_id={self.eos_token_id})"


def trim_offsets(text: str, offsets: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Drop leading whitespace from each (start, end) span, so " Paris" maps to "Paris" (whitespace-only spans kept)."""
    trimmed = []
    for start, end in offsets:
        visible = start
        while visible < end and text[visible].isspace():
            visible += 1
        trimmed.append((visible, end) if visible < end else (start, end))
    return trimmed


def _from_vocab_and_merges(directory: Path) -> Tokenizer:
    """Build the byte-level BPE the way transformers' GPT2Tokenizer does, then apply `added_tokens.json`."""
    backend = Tokenizer(BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt")))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    special_file = directory / "special_tokens_map.json"
    if special_file.is_file():
        for value in json.loads(special_file.read_text()).values():
            for token in value if isinstance(value, list) else [value]:
                content = token["content"] if isinstance(token, dict) else token
                if backend.token_to_id(content) is not None:  # only mark existing tokens; never grow the vocab here
                    backend.add_special_tokens([AddedToken(content, special=True, normalized=False)])
    added_file = directory / "added_tokens.json"
    if added_file.is_file():
        added: dict[str, int] = json.loads(added_file.read_text())
        # Added tokens get consecutive ids in the order added, so add them sorted by their recorded id.
        for token, token_id in sorted(added.items(), key=lambda item: item[1]):
            if backend.token_to_id(token) is None:
                backend.add_tokens([AddedToken(token, normalized=False)])
            if backend.token_to_id(token) != token_id:
                raise ValueError(
                    f"{added_file}: token {token!r} should have id {token_id} but got {backend.token_to_id(token)}; "
                    "the ids in added_tokens.json must continue vocab.json without gaps."
                )
    return backend
