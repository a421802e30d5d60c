"""The slow LLaMA tokenizer of transformers 4.28-4.31 (``LlamaTokenizer``, ``use_fast=False``), as LISA and GLaMM
checkpoints were trained and evaluated with it.

transformers 5 tokenises these folders differently, so the ids are reproduced here on ``sentencepiece`` alone:

1. the text is split on the added tokens (``added_tokens.json``) and the special tokens (``<s>``, ``</s>``,
   ``<unk>``), longest match first;
2. around every added token the neighbouring text loses its whitespace on both sides (4.31 strips left and
   right by default); a special token declared as an ``AddedToken`` with ``lstrip``/``rstrip`` false strips
   nothing. ``"ASSISTANT: [SEG]."`` -> ``"ASSISTANT:"``, ``[SEG]``, ``"."``;
3. each remaining piece of text is encoded by sentencepiece on its own, so each gets sentencepiece's dummy
   prefix (``"."`` -> ``"▁."``). With ``"legacy": false`` in ``tokenizer_config.json`` (4.31's other mode)
   only the first piece gets it.

``encode(text, add_special_tokens=True)`` puts ``<s>`` first, as ``tokenizer(text).input_ids`` does.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from grounding.errors import CheckpointError

SPIECE_UNDERLINE = "▁"


class SlowLlamaTokenizer:
    def __init__(self, folder: str | Path, legacy: bool | None = None):
        """``legacy``: None reads ``tokenizer_config.json``; True/False overrides it (GLaMM's folders say false,
        but its transformers had no such switch and tokenised the legacy way)."""
        folder = Path(folder)
        model_file = folder / "tokenizer.model"
        if not model_file.is_file():
            raise CheckpointError(f"no sentencepiece tokenizer: {model_file} does not exist")
        try:
            import sentencepiece as spm
        except ImportError as exc:   # a dependency of the project; say so if an install lost it
            raise CheckpointError("reading tokenizer.model needs the 'sentencepiece' package") from exc
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        self.legacy = bool(config.get("legacy", True)) if legacy is None else legacy
        self.add_bos_token = bool(config.get("add_bos_token", True))
        self.added: dict[str, int] = {str(k): int(v) for k, v in _read_json(folder / "added_tokens.json").items()}
        self.unk_token_id = self.sp.unk_id()
        self.bos_token_id = self.sp.bos_id()
        self.eos_token_id = self.sp.eos_id()
        self.pad_token_id = self.unk_token_id   # LISA / GLaMM: tokenizer.pad_token = tokenizer.unk_token
        self.pad_token = self.sp.id_to_piece(self.unk_token_id)
        self.eos_token = self.sp.id_to_piece(self.eos_token_id)
        self.bos_token = self.sp.id_to_piece(self.bos_token_id)
        # (strip left neighbour, strip right neighbour) per unsplittable token
        self._strip: dict[str, tuple[bool, bool]] = {t: (True, True) for t in self.added}
        for piece in (self.bos_token, self.eos_token, self.pad_token):
            declared = _declared(config, special_map, piece)
            self._strip[piece] = ((declared.get("lstrip", False), declared.get("rstrip", False))
                                  if isinstance(declared, dict) else (True, True))
        self._ids = {**{p: self.sp.piece_to_id(p) for p in (self.bos_token, self.eos_token, self.pad_token)},
                     **self.added}
        self._by_id = {i: t for t, i in self._ids.items()}
        tokens = sorted(self._ids, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(t) for t in tokens) + ")")

    def __len__(self) -> int:
        return max(self.sp.get_piece_size(), max(self.added.values(), default=-1) + 1)

    # ---- encoding -----------------------------------------------------------------------------------------
    def tokenize_ids(self, text: str) -> list[int]:
        """``text`` -> ids without ``<s>`` (4.31's ``tokenize`` then ``convert_tokens_to_ids``)."""
        if not self.legacy:
            text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        parts = self._split.split(text)   # text, token, text, token, ..., text
        for i in range(1, len(parts), 2):
            strip_left, strip_right = self._strip[parts[i]]
            if strip_right:
                parts[i + 1] = parts[i + 1].lstrip()
            if strip_left:
                parts[i - 1] = parts[i - 1].rstrip()
        ids: list[int] = []
        for i, part in enumerate(parts):
            if not part:
                continue
            ids.extend([self._ids[part]] if i % 2 else self._encode_text(part))
        return ids

    def _encode_text(self, text: str) -> list[int]:
        if self.legacy:
            return self.sp.encode(text)
        first = text.startswith(SPIECE_UNDERLINE)
        if first:
            text = text[1:]
        pieces = self.sp.encode(text, out_type=str)
        if not first and not text.startswith(" ") and pieces and pieces[0].startswith(SPIECE_UNDERLINE):
            pieces = ([pieces[0][1:]] if len(pieces[0]) > 1 else []) + pieces[1:]
        return [self.sp.piece_to_id(p) for p in pieces]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        bos = [self.bos_token_id] if add_special_tokens and self.add_bos_token else []
        return bos + self.tokenize_ids(text)

    def convert_tokens_to_ids(self, token: str) -> int:
        if token in self._ids:
            return self._ids[token]
        return self.sp.piece_to_id(token)

    # ---- decoding -----------------------------------------------------------------------------------------
    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Ids -> text: sentencepiece decodes runs of ordinary ids; added tokens are written as they are
        (``<s>``/``</s>``/``<unk>`` dropped with ``skip_special_tokens``)."""
        specials = {self.bos_token_id, self.eos_token_id, self.pad_token_id}
        out, run = [], []
        for t in (int(i) for i in ids):
            if t in self._by_id:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                if not (skip_special_tokens and t in specials):
                    out.append(self._by_id[t])
            elif 0 <= t < self.sp.get_piece_size():
                run.append(t)
        if run:
            out.append(self.sp.decode(run))
        return " ".join(p.strip() for p in out if p.strip())


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc


def _declared(config: dict, special_map: dict, piece: str):
    """How a folder declares special token ``piece`` (an AddedToken dict, or a plain string)."""
    for source in (config, special_map):
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = source.get(key)
            content = value.get("content") if isinstance(value, dict) else value
            if content == piece:
                return value
    return None
