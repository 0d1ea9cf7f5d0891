"""Tests for tokenizer.py. Fixtures are built here (a tiny SentencePiece model
trained on the fly and a hand-written tiktoken ranks file), so no network and
no real checkpoint files are needed."""
import base64
import json
import random

import jinja2
import pytest
import sentencepiece as spm
import tiktoken
from conftest import LLAMA2_TEMPLATE, LLAMA3_TEMPLATE

from decoding import StreamDecoder
from llama_fast.chat.templates import JinjaTemplate, Llama2Template, Llama3Template, chat_template
from tokenizer import (
    SentencePieceTokenizer,
    TiktokenTokenizer,
    TokenizerError,
    load_tokenizer,
    split_long_runs,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, hello there! How are you today?",
    "Café crème brûlée, naïve façade, jalapeño, Ünïcödé wörds.",
    "Numbers 0123456789 and symbols: ()[]{}<>#@!? 3.14159",
    "Streaming tokens one at a time is fun, isn't it?",
    "Chat templates wrap the user and assistant turns.",
    "  indented code:\n    return x + 1\n\ttabbed line",
    "日本語のテキスト。",
]
# Rare lines: below character_coverage, so these characters become byte tokens.
RARE = ["Price: 5 € 😀 🎉", "中文 привет мир", "Ωμέγα λόγος 🇺🇸"]

TEXTS = [
    "",
    "Hello world",
    "  leading and trailing spaces  ",
    "multiple   spaces\n\nand\ttabs\r\n",
    "Café naïve façade",
    "Price: 12 € 😀 中文 привет 🇺🇸 👨‍👩‍👧",
    "<|eot_id|> <s> </s> [INST] are plain text here",
    "numbers 1234567 and 3.14",
    "\u00a0nbsp \u200b zero-width \U0010ffff",
]

# Merges for the test tiktoken file, each the concatenation of two earlier tokens.
# Several cut multi-byte characters mid-way (€ = e2 82 ac, 中 = e4 b8 ad,
# 😀 = f0 9f 98 80), so single tokens carry partial UTF-8.
MERGES = [b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b"ld", b" world",
          b"in", b"ing", b"th", b"the", b" the", b"er", b" H", b" He", b"He", b"Hell", b"Hello",
          b"\xe2\x82", b"\xe2\x82\xac", b"\xe4\xb8", b"\xe4\xb8\xad",
          b"\xf0\x9f", b"\xf0\x9f\x98", b"\xf0\x9f\x98\x80", b"\n\n", b"  ", b"an", b"and"]

# Meta's Llama-3 split pattern and special tokens, written out independently of tokenizer.py.
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL = (["<|begin_of_text|>", "<|end_of_text|>"]
           + [f"<|reserved_special_token_{i}|>" for i in range(4)]
           + ["<|start_header_id|>", "<|end_header_id|>"]
           + ["<|reserved_special_token_4|>", "<|eot_id|>"]
           + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)])


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    # Trained like Llama-2's tokenizer: BPE, byte fallback, no normalization.
    sp_path = d / "sp.model"
    with open(sp_path, "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(CORPUS * 20 + RARE), model_writer=f, vocab_size=400,
            model_type="bpe", byte_fallback=True, split_digits=True,
            allow_whitespace_only_pieces=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            character_coverage=0.99, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    tokens = [bytes([b]) for b in range(256)]
    for m in MERGES:
        assert any(m[:i] in tokens and m[i:] in tokens for i in range(1, len(m))), m
        tokens.append(m)
    tk_path = d / "tiktoken.model"
    lines = [f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)]
    tk_path.write_text("".join(lines))
    return {"sp": sp_path, "tiktoken": tk_path, "ranks": {t: r for r, t in enumerate(tokens)}}


@pytest.fixture(scope="session")
def sp_tok(files):
    return load_tokenizer(files["sp"])


@pytest.fixture(scope="session")
def tk_tok(files):
    return load_tokenizer(files["tiktoken"])


@pytest.fixture(params=["sp", "tiktoken"])
def tok(request, sp_tok, tk_tok):
    return sp_tok if request.param == "sp" else tk_tok


# --- loading -------------------------------------------------------------------

def test_backend_chosen_by_content_not_name(files, tmp_path):
    misleading_sp = tmp_path / "tokenizer.tiktoken"
    misleading_sp.write_bytes(files["sp"].read_bytes())
    misleading_tk = tmp_path / "tokenizer.model"
    misleading_tk.write_bytes(files["tiktoken"].read_bytes())
    assert isinstance(load_tokenizer(misleading_sp), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(str(misleading_tk)), TiktokenTokenizer)


def test_missing_file(tmp_path):
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tmp_path / "nope.model")
    msg = str(e.value)
    assert "not found" in msg and "nope.model" in msg and "\n" not in msg
    with pytest.raises(TokenizerError):
        load_tokenizer(tmp_path)  # a directory is not a tokenizer file


@pytest.mark.parametrize("content", [
    b"",
    b"hello world\nthis is just text\n",
    b"\x00\x01\x02garbage\xff\xfe" * 50,
    b"aGVsbG8= 0\nd29ybGQ= 1\n",  # ranks format, but no single bytes
    # ranks format with all single bytes, but ranks are not 0..N-1
    b"".join(base64.b64encode(bytes([b])) + b" %d\n" % (b * 2) for b in range(256)),
])
def test_unreadable_file(tmp_path, content):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(path)
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    assert str(path) in msg and "\n" not in msg


# --- encode / decode -------------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text, bos=False)) == text
    bos_text = "" if isinstance(tok, SentencePieceTokenizer) else "<|begin_of_text|>"
    assert tok.decode(tok.encode(text)) == bos_text + text


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_join_to_the_text(tok, text):
    """Each token's bytes (the serving API's logprobs) join to the text's UTF-8 (after the space SentencePiece puts
    first, "▁" being a space); a special token is its name."""
    joined = b"".join(tok.token_bytes(i) for i in tok.encode(text, bos=False))
    space = b" " if isinstance(tok, SentencePieceTokenizer) and text else b""
    assert joined == space + text.encode()
    assert tok.token_bytes(tok.eos_ids[0]) in (b"</s>", b"<|end_of_text|>")


def test_bos_eos(tok):
    body = tok.encode("Hello world", bos=False)
    assert body and tok.bos_id not in body
    assert tok.encode("Hello world") == [tok.bos_id] + body
    assert tok.encode("Hello world", bos=False, eos=True) == body + [tok.eos_ids[0]]
    assert tok.encode("", bos=False) == []
    assert all(0 <= i < tok.vocab_size for i in tok.eos_ids + [tok.bos_id])


def test_sentencepiece_properties(sp_tok, files):
    sp = spm.SentencePieceProcessor(model_file=str(files["sp"]))
    assert sp_tok.vocab_size == 400 and sp_tok.bos_id == 1 and sp_tok.eos_ids == [2]
    assert sp_tok.encode("Café 😀") == [1] + sp.encode("Café 😀")
    # The rare characters really are byte-fallback tokens, e.g. € = <0xE2><0x82><0xAC>.
    assert [sp.id_to_piece(i) for i in sp.encode("€")[-3:]] == ["<0xE2>", "<0x82>", "<0xAC>"]
    assert sp_tok.decode(sp.encode("€")[:-1]).endswith("\ufffd")  # partial char never raises


def test_tiktoken_special_tokens(tk_tok, files):
    n = len(files["ranks"])
    assert tk_tok.vocab_size == n + 256
    assert tk_tok.bos_id == n and tk_tok.eos_ids == [n + 1, n + 9]  # <|end_of_text|>, <|eot_id|>
    assert [tk_tok.special_tokens[t] for t in SPECIAL] == list(range(n, n + 256))
    assert tk_tok.decode([n + 9, n + 255]) == "<|eot_id|><|reserved_special_token_250|>"
    # Special-token text typed by a user is encoded as ordinary text.
    ids = tk_tok.encode("<|eot_id|><|begin_of_text|>", bos=False)
    assert all(i < n for i in ids) and tk_tok.decode(ids) == "<|eot_id|><|begin_of_text|>"


def test_tiktoken_matches_reference_encoding(tk_tok, files):
    ref = tiktoken.Encoding("ref", pat_str=PATTERN, mergeable_ranks=files["ranks"],
                            special_tokens={})
    for text in TEXTS:
        assert tk_tok.encode(text, bos=False) == ref.encode_ordinary(text)
    ranks = files["ranks"]
    assert tk_tok.encode("hello world", bos=False) == [ranks[b"hello"], ranks[b" world"]]


def test_decode_bad_input_never_raises(tok):
    # Ids outside the vocabulary (a padded embedding table) are skipped.
    assert tok.decode([-1, tok.vocab_size, tok.vocab_size + 1000]) == ""
    euro = tok.encode("€", bos=False)
    for cut in range(len(euro)):
        tok.decode(euro[:cut])


def test_long_input_is_split_but_round_trips(tk_tok):
    text = "a" * 60_000 + " " * 30_000 + "b\n" * 10
    assert tk_tok.decode(tk_tok.encode(text, bos=False)) == text
    pieces = list(split_long_runs("xxxxx   yy" + " " * 7, max_run=3))
    assert "".join(pieces) == "xxxxx   yy" + " " * 7
    assert pieces == ["xxx", "xx   yy   ", "   ", " "]


# --- chat templates --------------------------------------------------------------

CONV = [
    {"role": "system", "content": "You are a helpful assistant. "},
    {"role": "user", "content": " Hello there! "},
    {"role": "assistant", "content": "Hello world, how are you?"},
    {"role": "user", "content": "Price of 😀 in €?\n"},
]


def test_llama3_chat_template(tk_tok, files):
    # Reference: render the template as one string, let tiktoken parse the specials.
    special = {t: len(files["ranks"]) + i for i, t in enumerate(SPECIAL)}
    ref = tiktoken.Encoding("ref", pat_str=PATTERN, mergeable_ranks=files["ranks"],
                            special_tokens=special)
    text = "<|begin_of_text|>" + "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
        for m in CONV)
    prompt = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    template = chat_template(tk_tok)  # Meta's format: what a Llama-3 tokenizer.model alone chats with
    assert template.name == "llama3" and template.end_of_turn == special["<|eot_id|>"]
    assert template.encode(CONV) == ref.encode(text + prompt, allowed_special="all")
    no_prompt = template.encode(CONV, add_generation_prompt=False)
    assert no_prompt == ref.encode(text, allowed_special="all")
    # Same shape as the real Llama-3 prompt: 128000, 128006, 9125 ("system"), 128007, 271 ("\n\n").
    system = ref.encode_ordinary("system")
    head = [special["<|begin_of_text|>"], special["<|start_header_id|>"]] + system
    head += [special["<|end_header_id|>"], files["ranks"][b"\n\n"]]
    assert template.encode(CONV)[:len(head)] == head


def test_llama2_chat_template(sp_tok, files):
    sp = spm.SentencePieceProcessor(model_file=str(files["sp"]))
    # Like Meta, the system block is folded in and only the combined text is
    # stripped, so the user's leading space survives after <</SYS>>.
    first = ("[INST] <<SYS>>\nYou are a helpful assistant. \n<</SYS>>\n\n Hello there! [/INST]"
             " Hello world, how are you? ")
    second = "[INST] Price of 😀 in €? [/INST]"
    expected = [1] + sp.encode(first) + [2] + [1] + sp.encode(second)
    assert Llama2Template(sp_tok).encode(CONV) == expected
    no_system = [{"role": "user", "content": "Hi"}]
    assert Llama2Template(sp_tok).encode(no_system) == [1] + sp.encode("[INST] Hi [/INST]")
    assert chat_template(sp_tok) is None  # a SentencePiece model alone says nothing of chat: no format is guessed


def test_llama2_chat_rejects_bad_roles(sp_tok):
    for template in (Llama2Template(sp_tok), JinjaTemplate(sp_tok, LLAMA2_TEMPLATE, "llama-2-chat")):
        with pytest.raises((ValueError, jinja2.TemplateError)):
            template.encode([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ValueError):
        Llama2Template(sp_tok).encode([{"role": "system", "content": "a"}])


def random_conversations(n: int, seed: int = 0):
    """Conversations of 1-4 user turns (replies between), some with a system message, of text without special
    tokens written out (a Jinja template makes those tokens, as transformers does; Meta's code keeps them text)."""
    rng = random.Random(seed)
    words = [w for w in " ".join(TEXTS + CORPUS).split(" ") if "<" not in w]

    def text():
        return " ".join(rng.choice(words) for _ in range(rng.randint(0, 12))) + rng.choice(["", " ", "\n", "€"])

    for _ in range(n):
        conv = [{"role": "system", "content": text()}] if rng.random() < 0.5 else []
        for turn in range(rng.randint(1, 4)):
            conv += [{"role": "assistant", "content": text()}] if turn else []
            conv.append({"role": "user", "content": text()})
        yield conv


def test_official_jinja_templates_encode_as_metas_formats(sp_tok, tk_tok):
    """Llama-2-chat's and Llama-3-Instruct's tokenizer_config.json templates, rendered and encoded with their
    special tokens, give the tokens of Meta's own formats (SentencePiece: each piece between special tokens
    encodes alone, with its leading space)."""
    pairs = [(JinjaTemplate(sp_tok, LLAMA2_TEMPLATE, "llama-2-chat"), Llama2Template(sp_tok)),
             (JinjaTemplate(tk_tok, LLAMA3_TEMPLATE, "llama-3-instruct"), Llama3Template(tk_tok))]
    for jinja_template, meta in pairs:
        assert jinja_template.end_of_turn == meta.end_of_turn
        for conv in random_conversations(40):
            assert jinja_template.encode(conv) == meta.encode(conv), conv


def test_where_the_template_comes_from(files, tmp_path):
    """--chat_template (a name, a Jinja file, a tokenizer_config.json), else the tokenizer_config.json beside the
    tokenizer, else Llama-3's format for a Llama-3 tokenizer.model, else none."""
    (tmp_path / "tokenizer.model").write_bytes(files["sp"].read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA2_TEMPLATE}))
    sp_tok = load_tokenizer(tmp_path / "tokenizer.model")
    assert isinstance(chat_template(sp_tok), JinjaTemplate) and chat_template(sp_tok).source == LLAMA2_TEMPLATE
    assert isinstance(chat_template(sp_tok, "llama2"), Llama2Template)
    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m.content }}</s>{% endfor %}")
    assert chat_template(sp_tok, str(tmp_path / "t.jinja")).end_of_turn == sp_tok.eos_ids[0]
    assert chat_template(sp_tok, str(tmp_path / "tokenizer_config.json")).source == LLAMA2_TEMPLATE
    for choice, says in [("llama3", "needs Llama-3's tiktoken"), (str(tmp_path / "none.jinja"), "no such file"),
                         (str(files["sp"]), "cannot read"), ("{% if %}", "no such file")]:
        with pytest.raises(TokenizerError, match=says):
            chat_template(sp_tok, choice)
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(TokenizerError, match="has no chat_template"):
        chat_template(sp_tok, str(tmp_path / "empty.json"))
    (tmp_path / "t.jinja").write_text("{% if messages[0].role != 'system' %}{{ raise_exception('system first') }}"
                                      "{% endif %}{% for m in messages %}{{ m.content }}</s>{% endfor %}")
    assert chat_template(sp_tok, str(tmp_path / "t.jinja")).end_of_turn == sp_tok.eos_ids[0]
    (tmp_path / "t.jinja").write_text("{{ raise_exception('never') }}")
    with pytest.raises(TokenizerError, match="cannot render a user turn and a reply: never"):
        chat_template(sp_tok, str(tmp_path / "t.jinja"))
    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")  # no reply shown
    assert chat_template(sp_tok, str(tmp_path / "t.jinja")).end_of_turn is None


# --- streaming -------------------------------------------------------------------

def stream(tok, ids, rng=None):
    decoder, out, i = StreamDecoder(tok), [], 0
    while i < len(ids):
        step = rng.choice([1, 1, 1, 2, 5]) if rng else 1
        out.append(decoder.push(ids[i:i + step]))
        i += step
    return "".join(out) + decoder.flush()


@pytest.mark.parametrize("text", TEXTS + RARE)
def test_stream_one_token_at_a_time(tok, text):
    ids = tok.encode(text, bos=False)
    assert stream(tok, ids) == tok.decode(ids) == text


def test_stream_never_emits_partial_characters(tok):
    text = "€😀中₹😁丁"
    ids = tok.encode(text, bos=False)
    assert len(ids) > len(text)  # some characters are split across tokens
    decoder = StreamDecoder(tok)
    pieces = [decoder.push([i]) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_stream_keeps_space_after_invisible_tokens(sp_tok):
    # SentencePiece drops the leading space of the first piece of a decode; after
    # eos mid-stream the next word's space must still come out.
    ids = sp_tok.encode("Hello") + sp_tok.eos_ids + sp_tok.encode("world", bos=False)
    assert stream(sp_tok, ids) == sp_tok.decode(ids) == "Hello world"


def test_stream_random_ids(tok):
    rng = random.Random(1)
    # Byte tokens, partial characters, bos/eos mid-stream, plus fully random ids.
    interesting = tok.encode("€😀中 Café", bos=False) + tok.eos_ids + [tok.bos_id]
    interesting += list(range(300))
    for _ in range(300):
        pool = interesting if rng.random() < 0.5 else range(tok.vocab_size)
        ids = [rng.choice(pool) for _ in range(rng.randint(0, 30))]
        assert stream(tok, ids, rng) == tok.decode(ids), ids


def test_stream_window_stays_small(tok):
    decoder = StreamDecoder(tok)
    ids = tok.encode(" ".join(CORPUS) * 5)
    out = ""
    for i in ids:
        out += decoder.push([i])
        assert len(decoder._ids) <= 8  # O(window), not O(everything so far)
    assert out + decoder.flush() == tok.decode(ids)
    assert decoder.push(tok.encode("again")) + decoder.flush() == tok.decode(tok.encode("again"))
