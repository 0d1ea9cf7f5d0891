"""Tokenizers for Llama-family checkpoints: encode/decode, each token's bytes, text with special tokens.

Three backends with the same interface, picked by load_tokenizer(path) from the file's content:
  SentencePieceTokenizer  Llama-2, Mistral, TinyLlama (tokenizer.model is a protobuf)
  TiktokenTokenizer       Llama-3/3.1/3.2 (tokenizer.model is base64 BPE ranks)
  HFTokenizer             any tokenizer.json (Qwen's byte-level BPE, ...), with the special tokens and EOS ids of
                          tokenizer_config.json and generation_config.json beside it
Each carries the chat template of the tokenizer_config.json beside it, if any (chat_template, the Jinja source);
llama_fast/chat renders it, and encode_rendered encodes what it renders.
"""
import base64
import functools
import json
import os
import re
from pathlib import Path
from typing import Union

import sentencepiece as spm
import tiktoken


class TokenizerError(ValueError):
    """A tokenizer file is missing or unreadable. The message is shown to users as-is."""


NOT_A_TOKENIZER = "not a SentencePiece model, a tiktoken BPE ranks file or a tokenizer.json"


def load_tokenizer(path) -> "Tokenizer":
    """Open a tokenizer file, choosing the backend by content: Llama-2 and Llama-3
    both call theirs `tokenizer.model`, so the name says nothing."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TokenizerError(f"tokenizer file not found: {path}")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TokenizerError(f"cannot read tokenizer file {path}: {e.strerror}") from None
    try:
        if data.lstrip().startswith(b"{"):
            return HFTokenizer.load(path, data)
        ranks = _parse_tiktoken_ranks(data)
        if ranks is not None:
            return with_chat_template(TiktokenTokenizer(ranks), Path(path).parent)
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(data)
        except RuntimeError:  # protobuf parse failure: neither format
            raise TokenizerError(NOT_A_TOKENIZER) from None
        return with_chat_template(SentencePieceTokenizer(sp), Path(path).parent)
    except TokenizerError as e:
        raise TokenizerError(f"cannot load tokenizer {path}: {e}") from None


def with_chat_template(tok, folder: Path):
    """A tokenizer.model with the chat template of the tokenizer_config.json beside it (a converted HF
    checkpoint has one: Llama-2-chat's [INST], TinyLlama-chat's Zephyr, Llama-3.1's with tools); the special
    tokens it names for the template (bos_token, ...) where it names them."""
    config = _read_json(folder / "tokenizer_config.json")
    tok.chat_template = chat_template(config)
    named = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    tok.template_tokens = {**tok.template_tokens, **{k: v for k, v in named.items() if v}}
    return tok


def _parse_tiktoken_ranks(data: bytes) -> dict[bytes, int] | None:
    """Parse `<base64 token> <rank>` lines (tiktoken's format), or return None."""
    ranks = {}
    try:
        for line in data.decode("ascii").splitlines():
            if line:  # tiktoken's own loader skips blank lines too
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except ValueError:  # covers UnicodeDecodeError and binascii.Error
        return None
    return ranks or None


def _valid_ids(ids, vocab_size: int) -> list[int]:
    # A model's embedding table is often padded past the tokenizer's vocabulary;
    # such ids have no text, so skip them instead of crashing mid-generation.
    return [int(i) for i in ids if 0 <= i < vocab_size]


# --- SentencePiece: Llama-2 / Mistral / TinyLlama --------------------------------

class SentencePieceTokenizer:
    def __init__(self, sp: spm.SentencePieceProcessor):
        if sp.get_piece_size() == 0:  # SentencePiece "loads" empty input as an empty model
            raise TokenizerError(NOT_A_TOKENIZER)
        if sp.bos_id() < 0 or sp.eos_id() < 0:
            raise TokenizerError("SentencePiece model has no BOS/EOS token")
        self._sp = sp
        self.vocab_size = sp.get_piece_size()
        self.bos_id = sp.bos_id()
        self.eos_ids = [sp.eos_id()]
        self.chat_template, self.template_tokens = None, {"bos_token": sp.id_to_piece(self.bos_id),
                                                          "eos_token": sp.id_to_piece(sp.eos_id())}

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + self._sp.encode(text) + self.eos_ids * eos

    def decode(self, ids: list[int]) -> str:
        # SentencePiece turns broken byte-fallback sequences into U+FFFD itself.
        return self._sp.decode(_valid_ids(ids, self.vocab_size))

    def token_bytes(self, id: int) -> bytes:
        """The bytes one token stands for ("▁" as a space; a control token as its name), as the serving API's
        logprobs show tokens."""
        piece = self._sp.id_to_piece(id)
        if self._sp.is_byte(id):  # byte fallback: <0xE2>
            return bytes([int(piece[3:5], 16)])
        return piece.encode() if self._sp.is_control(id) else piece.replace("\u2581", " ").encode()

    @functools.cached_property
    def special_ids(self) -> list[int]:
        """The ids that are never text (control tokens, <unk>)."""
        return [i for i in range(self.vocab_size) if self._sp.is_control(i) or self._sp.is_unknown(i)]

    def encode_rendered(self, text: str) -> list[int]:
        """Text a chat template rendered: special tokens written out (<s>, </s>) become their ids; each piece
        between them encodes as SentencePiece encodes it alone, with its leading space, as Meta's reference encodes
        a turn and transformers' legacy Llama tokenizer encodes a template."""
        return _split_specials(text, {self._sp.id_to_piece(i): i for i in self.special_ids},
                               lambda piece: self._sp.encode(piece))


# --- tiktoken: Llama-3 (matches Meta's llama3/tokenizer.py) --------------------------

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL_TOKENS = (  # 256 in all, numbered after the ranks
    ["<|begin_of_text|>", "<|end_of_text|>"]
    + [f"<|reserved_special_token_{i}|>" for i in range(4)]
    + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
    + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]
)

# tiktoken gets pathologically slow on huge inputs and on very long runs of
# (non-)whitespace, so Meta feeds it bounded pieces; we do the same.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000


def split_long_runs(s: str, max_run: int = MAX_RUN_CHARS):
    """Cut s so no piece has a run of more than max_run whitespace or non-whitespace
    characters (Meta's _split_whitespaces_or_nonwhitespaces)."""
    if len(s) <= max_run:  # fast path: no run can be too long
        yield s
        return
    run_len, run_is_space, start = 0, s[0].isspace(), 0
    for i, ch in enumerate(s):
        is_space = ch.isspace()
        if is_space != run_is_space:
            run_len, run_is_space = 1, is_space
        else:
            run_len += 1
            if run_len > max_run:
                yield s[start:i]
                start, run_len = i, 1
    yield s[start:]


class TiktokenTokenizer:
    def __init__(self, ranks: dict[bytes, int]):
        # Special ids are numbered from len(ranks), so ranks must be exactly 0..N-1;
        # tiktoken also needs every single byte to be able to encode any text.
        contiguous = sorted(ranks.values()) == list(range(len(ranks)))
        if not contiguous or any(bytes([b]) not in ranks for b in range(256)):
            raise TokenizerError("tiktoken ranks must be 0..N-1 and include all 256 single bytes")
        self.special_tokens = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self._enc = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                      special_tokens=self.special_tokens)
        self.vocab_size = self._enc.n_vocab
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        # Base models end with <|end_of_text|>, instruct models end turns with <|eot_id|>.
        self.eos_ids = [self.special_tokens["<|end_of_text|>"], self.special_tokens["<|eot_id|>"]]
        self.chat_template, self.template_tokens = None, {"bos_token": "<|begin_of_text|>",
                                                          "eos_token": "<|end_of_text|>"}

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = [self.bos_id] * bos
        for i in range(0, len(text), MAX_ENCODE_CHARS):
            for piece in split_long_runs(text[i:i + MAX_ENCODE_CHARS]):
                # Ordinary encoding: "<|eot_id|>" typed by a user stays plain text
                # (and never raises); templates insert special tokens by id.
                ids += self._enc.encode_ordinary(piece)
        return ids + self.eos_ids[:1] * eos

    def decode(self, ids: list[int]) -> str:
        # Bytes are joined first and decoded with errors="replace", so a character
        # split across tokens is only whole once all its tokens are there.
        return self._enc.decode(_valid_ids(ids, self.vocab_size))

    def token_bytes(self, id: int) -> bytes:
        return self._enc.decode_single_token_bytes(id)

    @property
    def special_ids(self) -> list[int]:
        return sorted(self.special_tokens.values())

    def encode_rendered(self, text: str) -> list[int]:
        """Text a chat template rendered: special tokens written out (<|eot_id|>) become their ids."""
        return _split_specials(text, self.special_tokens, lambda piece: self.encode(piece, bos=False))


# --- tokenizer.json: any Hugging Face fast tokenizer, as transformers' AutoTokenizer uses it ------------------

class HFTokenizer:
    def __init__(self, tok, config: dict, generation_config: dict):
        self._tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        special = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        self.bos_id = tok.token_to_id(special["bos_token"]) if special["bos_token"] else None
        eos = [tok.token_to_id(special["eos_token"])] if special["eos_token"] else []
        listed = generation_config.get("eos_token_id")
        listed = listed if isinstance(listed, list) else [] if listed is None else [listed]
        self.eos_ids = list(dict.fromkeys(i for i in eos + listed if i is not None))
        self.chat_template, self.template_tokens = chat_template(config), special

    @classmethod
    def load(cls, path: str, data: bytes) -> "HFTokenizer":
        """tokenizer.json, with tokenizer_config.json and generation_config.json from its folder if there."""
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # the tokenizers library's own error type, not exported
            raise TokenizerError(f"not a valid tokenizer.json ({str(e).splitlines()[0][:120]})") from None
        folder = Path(path).parent
        return cls(tok, _read_json(folder / "tokenizer_config.json"), _read_json(folder / "generation_config.json"))

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        # bos: the special tokens tokenizer.json's post-processor adds (Llama-3's BOS; none for Qwen), as
        # AutoTokenizer(text) does
        return self._tok.encode(text, add_special_tokens=bos).ids + self.eos_ids[:1] * eos

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(_valid_ids(ids, self.vocab_size), skip_special_tokens=True)

    def token_bytes(self, id: int) -> bytes:
        """A byte-level BPE token's characters stand for bytes (GPT-2's table); a SentencePiece-style one's are
        text, "▁" a space and <0xNN> a byte; an added token is its text."""
        token = self._tok.id_to_token(id) or ""
        if id in self._tok.get_added_tokens_decoder():
            return token.encode()
        if self._byte_level:
            return bytes(BYTE_OF_CHAR.get(c, 0) for c in token)
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            return bytes([int(token[3:5], 16)])
        return token.replace("\u2581", " ").encode()

    @functools.cached_property
    def special_ids(self) -> list[int]:
        return sorted(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    @functools.cached_property
    def _byte_level(self) -> bool:
        return '"ByteLevel"' in json.dumps(json.loads(self._tok.to_str()).get("decoder"))

    def encode_rendered(self, text: str) -> list[int]:
        """Text a chat template rendered: its special tokens written out become their ids (as every
        tokenizer.json splits them out of any text)."""
        return self.encode(text, bos=False)


def _gpt2_byte_table() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable bytes are themselves, the others are shifted past 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


BYTE_OF_CHAR = _gpt2_byte_table()


def _token_text(token) -> str | None:
    """A special token of tokenizer_config.json: a string, or transformers' serialized AddedToken."""
    return token.get("content") if isinstance(token, dict) else token


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from None


def chat_template(config: dict) -> str | None:
    """tokenizer_config.json's chat template (the default one where it lists several: tool_use, rag, ...)."""
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) and template.strip() else None


def _split_specials(text: str, specials: dict, encode) -> list[int]:
    """text's special tokens (specials: their text -> id) as their ids, the pieces between them through encode."""
    if not specials:
        return encode(text) if text else []
    pattern = "(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")"
    ids = []
    for i, piece in enumerate(re.split(pattern, text)):
        if i % 2:
            ids.append(specials[piece])
        elif piece:
            ids += encode(piece)
    return ids


Tokenizer = Union[SentencePieceTokenizer, TiktokenTokenizer, HFTokenizer]
