"""Tokenizers for Llama-family checkpoints: encode/decode, chat templates, streaming.

Three backends with the same interface, picked by load_tokenizer(path) from the file's content:
  SentencePieceTokenizer  Llama-2, Mistral, TinyLlama (tokenizer.model is a protobuf)
  TiktokenTokenizer       Llama-3/3.1/3.2 (tokenizer.model is base64 BPE ranks)
  HFTokenizer             any tokenizer.json (Qwen's byte-level BPE, ...), with the chat template, special tokens
                          and EOS ids of tokenizer_config.json and generation_config.json beside it
"""
import base64
import functools
import json
import os
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
            return TiktokenTokenizer(ranks)
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(data)
        except RuntimeError:  # protobuf parse failure: neither format
            raise TokenizerError(NOT_A_TOKENIZER) from None
        return SentencePieceTokenizer(sp)
    except TokenizerError as e:
        raise TokenizerError(f"cannot load tokenizer {path}: {e}") from None


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

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


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
        self.eot_id = sp.eos_id()  # what ends an assistant reply in the chat format

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

    # Chat: Meta's Llama-2 [INST] format (llama/generation.py, chat_completion).
    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Messages alternate user/assistant after an optional system message. A final
        user turn ends in [/INST], which is itself the generation prompt, so
        add_generation_prompt changes nothing in this format."""
        if messages and messages[0]["role"] == "system":
            if len(messages) < 2:
                raise ValueError("a system message must be followed by a user message")
            first = B_SYS + messages[0]["content"] + E_SYS + messages[1]["content"]
            messages = [{"role": messages[1]["role"], "content": first}] + messages[2:]
        roles = [m["role"] for m in messages]
        if any(r != "user" for r in roles[0::2]) or any(r != "assistant" for r in roles[1::2]):
            raise ValueError(f"Llama-2 chat needs user/assistant turns in alternation, got {roles}")
        ids = []
        for user, answer in zip(messages[0::2], messages[1::2]):
            pair = f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} "
            ids += self.encode(pair, bos=True, eos=True)
        if len(messages) % 2:
            ids += self.encode(f"{B_INST} {messages[-1]['content'].strip()} {E_INST}")
        return ids

    def encode_chat_turn(self, user_text: str, system: str | None = None,
                         first: bool = True) -> list[int]:
        """One user turn (each starts with bos in this format); the invariant is the
        one documented on TiktokenTokenizer.encode_chat_turn."""
        if system is not None:
            if not first:
                raise ValueError("a system prompt can only be given on the first turn")
            user_text = B_SYS + system + E_SYS + user_text
        return self.encode(f"{B_INST} {user_text.strip()} {E_INST}")

    def encode_reply(self, text: str) -> list[int]:
        """An assistant reply as encode_chat places it, ending in eos. Meta encodes
        "[/INST] {answer} " as one string, but SentencePiece pieces never span the
        space that starts a word, so the answer encodes the same on its own."""
        return self.encode(f"{text.strip()} ", bos=False, eos=True)


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
        self.eot_id = self.special_tokens["<|eot_id|>"]
        # Base models end with <|end_of_text|>, instruct models end turns with <|eot_id|>.
        self.eos_ids = [self.special_tokens["<|end_of_text|>"], self.eot_id]

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

    # Chat: Meta's Llama-3 ChatFormat.
    def _header(self, role: str) -> list[int]:
        return ([self.special_tokens["<|start_header_id|>"]] + self.encode(role, bos=False)
                + [self.special_tokens["<|end_header_id|>"]] + self.encode("\n\n", bos=False))

    def _message(self, role: str, content: str) -> list[int]:
        return self._header(role) + self.encode_reply(content)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        ids = [self.bos_id]
        for m in messages:
            ids += self._message(m["role"], m["content"])
        return ids + self._header("assistant") * add_generation_prompt

    def encode_chat_turn(self, user_text: str, system: str | None = None,
                         first: bool = True) -> list[int]:
        """Tokens for one new user turn plus the generation prompt, for chat loops
        that keep earlier turns in the KV cache. Invariant (tested):

            encode_chat([sys, u1, a1, u2, a2, u3]) ==
                encode_chat_turn(u1, sys, first=True) + encode_reply(a1)
                + encode_chat_turn(u2, first=False) + encode_reply(a2)
                + encode_chat_turn(u3, first=False)

        encode_reply(a) is what the model generates when it answers a, including
        the end-of-turn id it stops on, so feeding back the generated ids keeps the
        cache identical to a fresh encode_chat of the whole conversation."""
        if system is not None and not first:
            raise ValueError("a system prompt can only be given on the first turn")
        ids = [self.bos_id] if first else []
        if system is not None:
            ids += self._message("system", system)
        return ids + self._message("user", user_text) + self._header("assistant")

    def encode_reply(self, text: str) -> list[int]:
        """An assistant reply as encode_chat places it: content, then <|eot_id|>."""
        return self.encode(text.strip(), bos=False) + [self.eot_id]


# --- tokenizer.json: any Hugging Face fast tokenizer, as transformers' AutoTokenizer uses it ------------------

REPLY = "ReplyPlaceholder"  # stands for an assistant reply when a chat template is rendered to find its turns
EXCHANGE = [{"role": "user", "content": "UserPlaceholder"}, {"role": "assistant", "content": REPLY}]


class HFTokenizer:
    def __init__(self, tok, config: dict, generation_config: dict):
        self._tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.special = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        self.bos_id = tok.token_to_id(self.special["bos_token"]) if self.special["bos_token"] else None
        eos = [tok.token_to_id(self.special["eos_token"])] if self.special["eos_token"] else []
        listed = generation_config.get("eos_token_id")
        listed = listed if isinstance(listed, list) else [] if listed is None else [listed]
        self.eos_ids = list(dict.fromkeys(i for i in eos + listed if i is not None))
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template = template

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

    # Chat: the checkpoint's own Jinja template, rendered as transformers' apply_chat_template renders it.
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat_template in its tokenizer_config.json")
        return _jinja_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt), bos=False)

    def encode_chat_turn(self, user_text: str, system: str | None = None, first: bool = True) -> list[int]:
        """One user turn plus the generation prompt, with the invariant documented on
        TiktokenTokenizer.encode_chat_turn. A later turn is what the template adds to a conversation whose last
        reply ended in its end-of-turn token (e.g. ChatML's "\n<|im_start|>user\n...<|im_start|>assistant\n")."""
        if first:
            system_message = [{"role": "system", "content": system}] if system is not None else []
            return self.encode_chat(system_message + [{"role": "user", "content": user_text}])
        if system is not None:
            raise ValueError("a system prompt can only be given on the first turn")
        before = self.render_chat(EXCHANGE, add_generation_prompt=False)
        after = self.render_chat(EXCHANGE + [{"role": "user", "content": user_text}])
        if not after.startswith(before):
            raise TokenizerError("the chat template renders earlier turns differently once a turn is added")
        _, glue = self._reply_end
        return self.encode(glue + after[len(before):], bos=False)

    def encode_reply(self, text: str) -> list[int]:
        """An assistant reply as the template places it: the text, then its end-of-turn token."""
        return self.encode(text, bos=False) + [self.eot_id]

    @property
    def eot_id(self) -> int:
        """The special token that ends an assistant reply in the chat template (the first EOS without one)."""
        if not self.chat_template:
            return self.eos_ids[0] if self.eos_ids else None
        return self._tok.token_to_id(self._reply_end[0])

    @functools.cached_property
    def _reply_end(self) -> tuple[str, str]:
        """(the special token that ends a reply in this template, the text after it), from a rendered exchange."""
        rendered = self.render_chat(EXCHANGE, add_generation_prompt=False)
        tail = rendered[rendered.rindex(REPLY) + len(REPLY):]
        specials = [t.content for t in self._tok.get_added_tokens_decoder().values() if t.special]
        end = max((t for t in specials if tail.startswith(t)), key=len, default=None)
        if end is None:
            raise TokenizerError("the chat template does not end a reply with a special token")
        return end, tail[len(end):]


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


@functools.lru_cache(maxsize=8)  # rendered at every chat turn; compiled once
def _jinja_template(source: str):
    """The template compiled as transformers compiles chat templates: a sandbox, trim_blocks and lstrip_blocks,
    loop controls, its tojson and raise_exception, and the {% generation %} tag rendered as plain text."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"the chat template does not parse (line {e.lineno}: {e.message})") from None


Tokenizer = Union[SentencePieceTokenizer, TiktokenTokenizer, HFTokenizer]
