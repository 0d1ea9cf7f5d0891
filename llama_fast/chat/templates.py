"""Chat templates: how a conversation (OpenAI-style messages) becomes a prompt's token ids.

    template = chat_template(tokenizer, choice)      # choice: --chat_template (llama2, llama3 or a file), or None
    ids = template.encode(messages, add_generation_prompt=True, tools=None)
    template.end_of_turn                             # the token that ends an assistant reply: chat stops on it

Where the template comes from, the first that applies:
  1. --chat_template: "llama2" or "llama3" (Meta's formats, encoded as Meta's reference code encodes them), or a
     file: a Jinja template, or a tokenizer_config.json that holds one;
  2. the tokenizer_config.json beside the tokenizer (every Hugging Face chat model has one, and the converter
     keeps it beside the checkpoint);
  3. Meta's Llama-3 format for a Llama-3 tiktoken tokenizer.model, whose special tokens are that format's.
Otherwise the checkpoint has none, and chat is refused (NO_TEMPLATE): a base model's tokenizer says nothing of chat,
and a guessed format (Llama-2's [INST] for every SentencePiece model) gives a chat model prompts it never saw.
"""
import datetime
import functools
import json
from pathlib import Path

from tokenizer import TiktokenTokenizer, TokenizerError, chat_template as config_template

BUILT_IN = ("llama2", "llama3")
NO_TEMPLATE = ("this checkpoint has no chat template (no chat_template in a tokenizer_config.json beside its "
               "tokenizer): give --chat_template llama2, llama3 or a Jinja file")
REPLY = "ReplyPlaceholder"  # stands for an assistant reply when a template is rendered to find where replies end
EXCHANGE = [{"role": "user", "content": "UserPlaceholder"}, {"role": "assistant", "content": REPLY}]


def chat_template(tokenizer, choice: str | None = None):
    """The chat template for tokenizer (see the module's docstring), or None when it has none."""
    if choice == "llama2":
        return Llama2Template(tokenizer)
    if choice == "llama3":
        return Llama3Template(tokenizer)
    if choice is not None:
        return JinjaTemplate(tokenizer, read_template(choice), name=choice)
    if tokenizer.chat_template:
        return JinjaTemplate(tokenizer, tokenizer.chat_template, name="the tokenizer's tokenizer_config.json")
    if isinstance(tokenizer, TiktokenTokenizer):
        return Llama3Template(tokenizer)
    return None


def stop_ids(template) -> list[int]:
    """The ids that end a reply: the tokenizer's end-of-sequence ids and the template's end of turn."""
    end = [template.end_of_turn] if template.end_of_turn is not None else []
    return list(dict.fromkeys([*template.tokenizer.eos_ids, *end]))


def read_template(path: str) -> str:
    """A Jinja file, or a tokenizer_config.json's chat_template."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenizerError(f"--chat_template: no such file, and not one of {', '.join(BUILT_IN)}: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"--chat_template: cannot read {path}: {e}") from None
    if path.endswith(".json"):
        try:
            template = config_template(json.loads(text))
        except ValueError as e:
            raise TokenizerError(f"--chat_template: {path} is not JSON ({e})") from None
        if template is None:
            raise TokenizerError(f"--chat_template: {path} has no chat_template")
        return template
    return text


def no_tools(name: str, tools, messages: list):
    if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        raise ValueError(f"the {name} chat format has no tool calls: give --chat_template a template that has")


class JinjaTemplate:
    """A Jinja chat template (Hugging Face's format), rendered as transformers' apply_chat_template renders it."""

    def __init__(self, tokenizer, source: str, name: str):
        self.tokenizer, self.source, self.name = tokenizer, source, name
        self.compiled = compile_jinja(source)
        self.takes_tools = "tools" in referenced_names(source)
        self.end_of_turn = self.find_end_of_turn()

    def render(self, messages: list, add_generation_prompt: bool = True, tools: list | None = None) -> str:
        if tools and not self.takes_tools:
            raise ValueError(f"the chat template ({self.name}) does not show tools to the model")
        tools = {"tools": tools} if tools else {}
        return self.compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                    **self.tokenizer.template_tokens, **tools)

    def encode(self, messages: list, add_generation_prompt: bool = True, tools: list | None = None) -> list[int]:
        return self.tokenizer.encode_rendered(self.render(messages, add_generation_prompt, tools))

    def find_end_of_turn(self) -> int | None:
        """The first special token after a reply in a rendered exchange (ChatML's <|im_end|>, Llama-3's
        <|eot_id|>, Llama-2's </s>), or None when replies end without one."""
        try:
            rendered = self.render(EXCHANGE, add_generation_prompt=False)
        except Exception:  # some templates want a system message first
            try:
                rendered = self.render([{"role": "system", "content": "S"}, *EXCHANGE], add_generation_prompt=False)
            except Exception as e:  # the template's own raise_exception, or a mistake in it: it cannot chat
                raise TokenizerError(f"the chat template ({self.name}) cannot render a user turn and a reply: "
                                     f"{str(e)[:200]}") from None
        if REPLY not in rendered:
            raise TokenizerError(f"the chat template ({self.name}) does not show an assistant's reply")
        special = set(self.tokenizer.special_ids)
        tail = self.tokenizer.encode_rendered(rendered[rendered.rindex(REPLY) + len(REPLY):])
        return next((i for i in tail if i in special), None)


# Meta's formats, as their reference code encodes them: llama/generation.py's chat_completion (Llama-2) and
# llama3/tokenizer.py's ChatFormat. Text a user types is always text here, "<|eot_id|>" included.

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


class Llama2Template:
    name, source, takes_tools = "llama2", None, False

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.end_of_turn = tokenizer.eos_ids[0]

    def encode(self, messages: list, add_generation_prompt: bool = True, tools: list | None = None) -> list[int]:
        """Messages alternate user/assistant after an optional system message. A final user turn ends in [/INST],
        which is itself the generation prompt, so add_generation_prompt changes nothing in this format."""
        no_tools(self.name, tools, messages)
        if messages and messages[0]["role"] == "system":
            if len(messages) < 2:
                raise ValueError("a system message must be followed by a user message")
            first = B_SYS + messages[0]["content"] + E_SYS + messages[1]["content"]
            messages = [{"role": messages[1]["role"], "content": first}] + messages[2:]
        roles = [m["role"] for m in messages]
        if any(r != "user" for r in roles[0::2]) or any(r != "assistant" for r in roles[1::2]):
            raise ValueError(f"Llama-2 chat needs user/assistant turns in alternation, got {roles}")
        ids, encode = [], self.tokenizer.encode
        for user, answer in zip(messages[0::2], messages[1::2]):
            ids += encode(f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} ", eos=True)
        if len(messages) % 2:
            ids += encode(f"{B_INST} {messages[-1]['content'].strip()} {E_INST}")
        return ids


class Llama3Template:
    name, source, takes_tools = "llama3", None, False

    def __init__(self, tokenizer):
        if not isinstance(tokenizer, TiktokenTokenizer):
            raise TokenizerError("--chat_template llama3 needs Llama-3's tiktoken tokenizer.model (its special "
                                 "tokens are the format's)")
        self.tokenizer = tokenizer
        self.end_of_turn = tokenizer.special_tokens["<|eot_id|>"]

    def header(self, role: str) -> list[int]:
        special = self.tokenizer.special_tokens
        return ([special["<|start_header_id|>"]] + self.tokenizer.encode(role, bos=False)
                + [special["<|end_header_id|>"]] + self.tokenizer.encode("\n\n", bos=False))

    def encode(self, messages: list, add_generation_prompt: bool = True, tools: list | None = None) -> list[int]:
        no_tools(self.name, tools, messages)
        ids = [self.tokenizer.bos_id]
        for m in messages:
            ids += self.header(m["role"]) + self.tokenizer.encode(m["content"].strip(), bos=False)
            ids.append(self.end_of_turn)
        return ids + self.header("assistant") * add_generation_prompt


def referenced_names(source: str) -> set:
    import jinja2.meta
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return jinja2.meta.find_undeclared_variables(ImmutableSandboxedEnvironment().parse(source))


@functools.lru_cache(maxsize=8)
def compile_jinja(source: str):
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
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)  # Llama-3.2's date line
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"the chat template does not parse (line {e.lineno}: {e.message})") from None
