"""Conversations: chat templates, messages read from a row, and which tokens of a rendered conversation are the
assistant's.

A template is the tokenizer's own, a built-in one, a .jinja file or the Jinja text. The assistant's tokens are found
in one of two ways. A template that marks them with `{% generation %}` is asked directly
(`apply_chat_template(..., return_assistant_tokens_mask=True)`). Any other template is rendered incrementally: the
conversation up to each assistant turn with the generation prompt, then through that turn; the characters between are
the turn (its content and its end-of-turn token, the whitespace after that left out), and the tokens of the whole
rendered text whose first character falls there are trained on.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from peft_tuner.data.sources import DataError

ROLES = ("system", "user", "assistant", "tool")

BUILTIN_TEMPLATES = {
    # ChatML, as SmolLM2 and Qwen write it, without a default system message.
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
               "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    # Llama 3, with the assistant's content and end-of-turn token marked for return_assistant_tokens_mask.
    "llama3": ("{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
               "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim }}<|eot_id|>"
               "{% endgeneration %}{% else %}{{ message['content'] | trim }}<|eot_id|>{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    # Zephyr: the turn ends with the tokenizer's EOS.
    "zephyr": ("{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"),
}
_GENERATION_MARK = re.compile(r"{%-?\s*generation\s*-?%}")
_MARKER = "\u2063PEFTTUNERMARK\u2063"  # stands for a message's content while the template's wrapping is measured


def resolve_chat_template(spec: Optional[str], tokenizer, source: str = "the model") -> str:
    """The Jinja text of data.chat_template: null (the tokenizer's own), a built-in name, a file, or the text itself."""
    if spec is None:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"data.chat_template: the tokenizer of {source} has no chat template; set data.chat_template "
                            f"to one of {', '.join(BUILTIN_TEMPLATES)}, a .jinja file or the template's text")
        return tokenizer.chat_template
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    if "{{" in spec or "{%" in spec:
        return spec
    path = Path(spec).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise DataError(f"data.chat_template: '{spec}' is neither a built-in template ({', '.join(BUILTIN_TEMPLATES)}), "
                    f"a file, nor Jinja text")


def uses_generation_marks(template: str) -> bool:
    return bool(_GENERATION_MARK.search(template))


def read_messages(value, where: str) -> list[dict]:
    """A row's conversation: a list of {role, content}, or that list as JSON text (a CSV cell)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not a JSON list of messages ({e}); write [{{\"role\": \"user\", \"content\": "
                            f"\"...\"}}, ...]") from e
    if hasattr(value, "tolist"):  # a parquet / arrow list
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: expected a non-empty list of messages {{role, content}}, got {str(value)[:80]!r}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: message {i + 1} is not a {{role, content}} mapping: {str(message)[:80]!r}")
        if message["role"] not in ROLES:
            raise DataError(f"{where}: message {i + 1} has role '{message['role']}'; roles are {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise DataError(f"{where}: message {i + 1}'s content is not text")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def render(tokenizer, template: str, messages: list[dict], generation_prompt: bool = False) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except TemplateError as e:
        raise DataError(f"data.chat_template: the template failed on a conversation of roles "
                        f"{[m['role'] for m in messages]}: {e}") from e


def encode_rendered(tokenizer, text: str) -> list[int]:
    """A rendered conversation's tokens: the template wrote every special token it wants (a BOS among them)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def assistant_token_mask(tokenizer, template: str, messages: list[dict],
                         loss_on: str = "assistant") -> tuple[list[int], list[bool]]:
    """(token ids of the whole conversation, which of them are trained on): every assistant turn with its end-of-turn
    token (loss_on=assistant), the last one only (last_assistant), or every token (all)."""
    if loss_on == "all":
        ids = encode_rendered(tokenizer, render(tokenizer, template, messages))
        return ids, [True] * len(ids)
    if uses_generation_marks(template):
        out = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
        if loss_on == "last_assistant":
            runs = _runs(mask)
            mask = [False] * len(mask)
            if runs:
                start, end = runs[-1]
                mask[start:end] = [True] * (end - start)
        return ids, mask
    text = render(tokenizer, template, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or (loss_on == "last_assistant" and i != _last_assistant(messages)):
            continue
        before = render(tokenizer, template, messages[:i], generation_prompt=True)
        through = render(tokenizer, template, messages[:i + 1])
        if not (text.startswith(before) and text.startswith(through) and len(through) > len(before)):
            raise DataError(f"data.chat_template: on a conversation of roles {[m['role'] for m in messages]}, the "
                            f"template renders the part before assistant turn {i + 1} "
                            f"differently from the whole conversation, so its tokens cannot be found; use a template "
                            f"that marks them with {{% generation %}}, or data.loss_on=all")
        spans.append((len(before), len(through.rstrip())))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(start <= first < end for start, end in spans) for first, _ in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), mask


def _last_assistant(messages: list[dict]) -> int:
    return max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)


def _runs(mask: list[bool]) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, on in enumerate(mask + [False]):
        if on and start is None:
            start = i
        elif not on and start is not None:
            runs.append((start, i))
            start = None
    return runs


def split_for_generation(messages: list[dict]) -> tuple[list[dict], Optional[str]]:
    """(the conversation before its last assistant turn, that turn's content as the reference); a conversation that
    ends with the user's turn has no reference."""
    last = _last_assistant(messages)
    if last < 0 or last != len(messages) - 1:
        return messages, None
    return messages[:last], messages[last]["content"]


def end_of_turn_ids(tokenizer, template: str) -> list[int]:
    """The token(s) the template writes after an assistant's content (`<|im_end|>`, `<|eot_id|>`, EOS)."""
    text = render(tokenizer, template, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARKER}])
    after = text.split(_MARKER, 1)[1].rstrip() if _MARKER in text else ""
    return encode_rendered(tokenizer, after) if after else []


def answer_stop_ids(tokenizer, template: str) -> list[int]:
    """What ends a generated answer: EOS and the template's end-of-turn token."""
    ids = [tokenizer.eos_token_id, *end_of_turn_ids(tokenizer, template)[:1]]
    return list(dict.fromkeys(t for t in ids if t is not None))


def user_turn_wrapping(tokenizer, template: str, system_prompt: Optional[str]) -> tuple[list[int], list[int]]:
    """(tokens before a user's content, tokens after it up to where the assistant begins to answer): a prompt rendered
    as a chat is head + content + tail."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
        [{"role": "user", "content": _MARKER}]
    text = render(tokenizer, template, messages, generation_prompt=True)
    if _MARKER not in text:
        raise DataError("data.chat_template: the template does not write the user's message")
    head, tail = text.split(_MARKER, 1)
    return encode_rendered(tokenizer, head), encode_rendered(tokenizer, tail)
