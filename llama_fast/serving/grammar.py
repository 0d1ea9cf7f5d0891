"""Structured output: a JSON schema (or any JSON object) turned into a token mask per row per step, so that what a
request generates always parses and validates. The grammar work is llguidance's (Microsoft's library made for
this, MIT, no dependencies): it compiles a schema against the tokenizer's vocabulary once and then, each step,
says which tokens may come next. Chosen over xgrammar (3x faster per mask, but it silently loosened or broke some
schemas: allOf, patternProperties, unanchored patterns); llguidance refuses what it does not implement
(uniqueItems, contains, not, if/then/else), which becomes a 400.

    grammars = Grammars(tokenizer, vocab_size=model.config.vocab_size)
    matcher = grammars.matcher(schema)          # a dict, or None for any JSON object; GrammarError if refused
    masks = grammars.masks([matcher, ...])      # (rows, V) bool: True where the token may come next
    matcher.accept(token)

Whitespace is compact ({"a":1,"b":[2,3]}): a model allowed any whitespace can spend its tokens on it. An object
whose schema lists its properties has no others (closed()).
"""
import collections
import json
import os
import threading

import llguidance
import torch

CACHE_SIZE = 256  # compiled schemas kept
NAMED = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")  # name -> schema maps
DATA = ("enum", "const", "default", "examples")  # values, not schemas


class GrammarError(ValueError):
    """A schema that cannot be compiled (an unsupported keyword, a bad $ref or pattern): the client's 400."""


class Vocabulary:
    """What llguidance reads of a tokenizer: each token's bytes (b"" for tokens that are never text), the
    end-of-sequence ids, and an encoder it calls for text the grammar forces."""

    def __init__(self, tokenizer, vocab_size: int):
        special = set(tokenizer.special_ids) | set(range(tokenizer.vocab_size, vocab_size))  # padded rows
        self.tokens = [b"" if i in special else tokenizer.token_bytes(i) for i in range(vocab_size)]
        self.special_token_ids = sorted(special)
        self.eos_token_id = tokenizer.eos_ids[0]
        self.bos_token_id = tokenizer.bos_id
        self.tokenizer = tokenizer

    def __call__(self, text) -> list[int]:
        """Ids whose bytes are exactly text's (llguidance asks for the text a grammar forces). The tokenizer's own
        encoding if it spells the text; SentencePiece puts a space before the first word ("{" would be "▁{"), so
        then the text after a newline, without the newline's tokens; else the longest token at each point."""
        text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        wanted = text.encode()
        ids = self.tokenizer.encode(text, bos=False)
        if b"".join(self.tokens[i] for i in ids) == wanted:
            return ids
        ids = self.tokenizer.encode("\n" + text, bos=False)
        for k in range(len(ids)):
            if b"".join(self.tokens[i] for i in ids[:k + 1]).endswith(b"\n") and \
                    b"".join(self.tokens[i] for i in ids[k + 1:]) == wanted:
                return ids[k + 1:]
        return self.longest_first(wanted)

    def longest_first(self, wanted: bytes) -> list[int]:
        """The bytes as the longest tokens that spell them, left to right (a tokenizer whose normalizer turns the
        newline into a space, as the demo's does, defeats the newline above)."""
        if not hasattr(self, "by_bytes"):
            self.by_bytes = {b: i for i, b in reversed(list(enumerate(self.tokens))) if b}
            self.longest = max(map(len, self.by_bytes))
        ids, at = [], 0
        while at < len(wanted):
            n = next((n for n in range(min(self.longest, len(wanted) - at), 0, -1)
                      if wanted[at:at + n] in self.by_bytes), None)
            if n is None:
                raise ValueError(f"no token spells {wanted[at:at + 1]!r}")
            ids.append(self.by_bytes[wanted[at:at + n]])
            at += n
        return ids


class Matcher:
    """One request's place in its grammar."""

    def __init__(self, matcher: "llguidance.LLMatcher"):
        self.llg = matcher

    def accept(self, token: int) -> bool:
        return self.llg.consume_token(token)

    def error(self) -> str:
        return self.llg.get_error()

    def complete(self) -> bool:
        """Whether the output so far is a whole value (the end of sequence may come now)."""
        return self.llg.is_accepting()


class Grammars:
    """The tokenizer's vocabulary as llguidance holds it, and the schemas compiled against it (LRU)."""

    def __init__(self, tokenizer, vocab_size: int):
        self.vocab_size = vocab_size
        self.vocabulary = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Vocabulary(tokenizer, vocab_size)),
                                                 eos_token=list(tokenizer.eos_ids))
        # SentencePiece's first word carries its space ("▁{"), and decoding drops it: allow one before the JSON
        self.space = '" "? ' if type(tokenizer).__name__ == "SentencePieceTokenizer" else ""
        # a batch's masks on several threads: on 2 cores, 8 rows of stories110M decoded at 0.88 of unconstrained
        # speed with one thread, 0.93 with two (BENCHMARKS.md)
        self.executor = llguidance.LLExecutor(num_threads=min(8, os.cpu_count() or 1))
        self.compiled = collections.OrderedDict()  # schema text -> a matcher at the start, copied for each request
        self.lock = threading.Lock()  # HTTP handlers compile on threads of their own

    def matcher(self, schema: dict | None) -> Matcher:
        """A matcher at the start of schema's grammar (None: any JSON object). The properties' order is kept: it
        is the order the model writes them in."""
        return self.compile(f"start: {self.space}j\nj: %json {compact(schema or {'type': 'object'})}")

    def tool_matcher(self, fmt, tools: list[dict], named: str | None, parallel: bool) -> Matcher:
        """A matcher that lets the model write only calls of these tools (OpenAI's), in the tool-call format fmt
        (chat/tool_calls.py), each call's arguments valid for its function's parameters; named: that function
        only, once; parallel: one call or more."""
        chosen = [t for t in tools if named is None or t["function"]["name"] == named]
        calls = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                   fmt.arguments: t["function"].get("parameters") or {}},
                  "required": ["name", fmt.arguments]} for t in chosen]
        call = [json.dumps(fmt.begin)] * bool(fmt.begin) + ["j"] + [json.dumps(fmt.end)] * bool(fmt.end)
        several = f"call ({json.dumps(fmt.separator)} call)*" if parallel and named is None else "call"
        return self.compile(f"start: {self.space}{several}\ncall: {' '.join(call)}\n"
                            f"j: %json {compact(calls[0] if len(calls) == 1 else {'anyOf': calls})}")

    def compile(self, grammar: str) -> Matcher:
        """A matcher at the start of a Lark grammar (llguidance's), compiled once and then copied."""
        key = grammar
        with self.lock:
            start = self.compiled.get(key)
            if start is not None:
                self.compiled.move_to_end(key)
        if start is None:
            try:
                start = llguidance.LLMatcher(self.vocabulary, grammar, log_level=0)
            except ValueError as e:
                raise GrammarError(first_line(str(e))) from None
            if start.is_error():
                raise GrammarError(first_line(start.get_error()))
            with self.lock:
                self.compiled[key] = start
                while len(self.compiled) > CACHE_SIZE:
                    self.compiled.popitem(last=False)
        return Matcher(start.deep_copy())

    def masks(self, matchers: list[Matcher]) -> torch.Tensor:
        """(rows, vocab_size) bool, True where a token may come next: one call for all rows, computed by
        llguidance's threads without the GIL."""
        words = torch.zeros(len(matchers), -(-self.vocab_size // 32), dtype=torch.int32)
        self.executor.unsafe_compute_mask_ptr([(m.llg, i) for i, m in enumerate(matchers)], words.data_ptr(),
                                              words.shape[1] * 4, len(matchers))
        bits = (words.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
        return bits.flatten(1)[:, :self.vocab_size].bool()


def compact(schema: dict) -> str:
    """The schema closed (below), as llguidance's %json takes it: the JSON written without whitespace."""
    schema = closed(schema)
    return json.dumps({**schema, "x-guidance": {**schema.get("x-guidance", {}), "whitespace_flexible": False}})


def closed(schema):
    """The schema with every object that lists its properties closed to others (additionalProperties false where
    it says nothing), as xgrammar's strict mode and OpenAI's strict schemas have it: JSON Schema's default would let
    the model invent keys, and a model under a mask takes what it is let."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in DATA:
            out[key] = value
        elif key in NAMED and isinstance(value, dict):
            out[key] = {name: closed(s) for name, s in value.items()}
        else:
            out[key] = closed(value)
    if "properties" in schema and "additionalProperties" not in schema and "patternProperties" not in schema:
        out["additionalProperties"] = False
    return out


def first_line(error: str) -> str:
    """llguidance's message without the parser state and grammar listing it appends."""
    lines = [line.strip() for line in error.split("\n<state>")[0].splitlines()]
    return " ".join(line for line in lines[:4] if line and not line[:1].isdigit())[:300] or "invalid schema"
