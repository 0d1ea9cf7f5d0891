"""generate.py --interactive: a chat in the terminal that keeps the conversation in the KV cache.

Each turn encodes the whole conversation with the chat template, as a server would, and prefills only what the
cache does not hold already: the tokens after the longest prefix it shares with what the cache holds. So a turn
costs its new tokens, and what the model sees is exactly a fresh encoding of the conversation (a reply the template
re-encodes differently than it was generated is re-read from where the two part).
"""
import jinja2

from decoding import StreamDecoder, generate
from llama_fast.chat.templates import stop_ids


def chat(model, tokenizer, template, sampling, system: str | None, max_seq_length: int, max_new_tokens: int, steps):
    cache_len = min(max_seq_length or model.config.max_seq_len, model.config.max_seq_len)
    model.setup_caches(1, cache_len)
    stop = stop_ids(template)
    start = [{"role": "system", "content": system}] if system is not None else []
    messages, cached = list(start), []  # cached: the token ids the KV cache holds, in order
    print(f"Chat ({cache_len}-token context, chat template: {template.name}). Empty line or Ctrl-D to quit.",
          flush=True)
    while True:
        try:
            user = input("\nUser: ").strip()
        except EOFError:
            break
        if not user:
            break
        ids = encode(template, messages + [{"role": "user", "content": user}], cache_len)
        if ids is None and messages != start:
            print(f"[context full: {len(cached)} of {cache_len} tokens used; starting a new conversation]",
                  flush=True)
            messages, cached = list(start), []
            ids = encode(template, messages + [{"role": "user", "content": user}], cache_len)
            if ids is None:
                print("[message too long for the context]", flush=True)
                continue
        if not ids:
            continue
        messages.append({"role": "user", "content": user})
        keep = common_prefix(cached, ids[:-1])  # the last prompt token is prefilled: its logits start the reply
        reply = turn(model, tokenizer, ids[keep:], keep, cache_len, sampling, max_new_tokens, stop, steps)
        cached = ids + reply[:-1]  # the last sampled token was never fed back
        messages.append({"role": "assistant", "content": tokenizer.decode([t for t in reply if t not in stop])})


def encode(template, messages: list, cache_len: int) -> list[int] | None:
    """The conversation's ids ([] when the template refuses it, which is said), or None when they leave no room to
    answer."""
    try:
        ids = template.encode(messages)
    except (ValueError, jinja2.TemplateError) as e:
        print(f"[the chat template refuses this conversation: {e}]", flush=True)
        return []
    return ids if len(ids) + 1 < cache_len else None


def common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def turn(model, tokenizer, new: list, pos: int, cache_len: int, sampling, max_new_tokens: int, stop: list, steps):
    """Stream the reply to new tokens prefilled at cache position pos; its tokens."""
    stream = StreamDecoder(tokenizer)
    print("Assistant: ", end="", flush=True)

    def show(step, token):
        t = token[0, 0].item()
        if t not in stop:
            print(stream.push([t]), end="", flush=True)

    result = generate(model, [new], min(max_new_tokens, cache_len - pos - len(new)), sampling, stop,
                      start_pos=pos, cache_len=cache_len, steps=steps, on_token=show)
    print(stream.flush(), flush=True)
    return result.tokens[0]
