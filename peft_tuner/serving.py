"""What the serving tools need beside a GGUF file: an Ollama Modelfile whose TEMPLATE is the model's chat template in
Ollama's own template language, and a check of a LoRA adapter against what vLLM's LoRA loader accepts.

The Modelfile's TEMPLATE is read off the chat template itself: it is rendered with marked messages to find what it
writes around a system, a user and an assistant message and after the conversation (the generation prompt), those
pieces are put into a Go template, and the result is checked by rendering three conversations both ways. A template
whose turns do not come apart that way (one that folds the system message into the first user turn, say) gets no
TEMPLATE line, and the report says so.
"""
from __future__ import annotations

from typing import Optional

MARK = {"system": "\u2063SYSTEM\u2063", "user": "\u2063USER\u2063", "assistant": "\u2063ASSISTANT\u2063"}
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's --max-lora-rank takes
VLLM_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # Llama family


def chat_pieces(render) -> Optional[dict]:
    """The text a chat template writes around each role's message, as a dict (system_before/after, user_before/after,
    assistant_before/after, generation, default_system), or None where the template's turns do not come apart.
    `render(messages, generation_prompt)` renders with the template."""
    s, u, a = MARK["system"], MARK["user"], MARK["assistant"]
    system_alone = render([{"role": "system", "content": s}], False)
    with_user = render([{"role": "system", "content": s}, {"role": "user", "content": u}], False)
    full = render([{"role": "system", "content": s}, {"role": "user", "content": u}, {"role": "assistant", "content": a}], False)
    prompted = render([{"role": "system", "content": s}, {"role": "user", "content": u}], True)
    if not (system_alone.count(s) == 1 and with_user.startswith(system_alone) and full.startswith(with_user)
            and prompted.startswith(with_user)):
        return None
    system_before, system_after = system_alone.split(s)
    user_before, user_after = with_user[len(system_alone):].split(u)
    assistant_before, assistant_after = full[len(with_user):].split(a)
    pieces = {"system_before": system_before, "system_after": system_after, "user_before": user_before,
              "user_after": user_after, "assistant_before": assistant_before, "assistant_after": assistant_after,
              "generation": prompted[len(with_user):], "default_system": None}
    before_user = render([{"role": "user", "content": u}], False).split(u)[0]
    if not before_user.endswith(user_before):
        return None
    head = before_user[:len(before_user) - len(user_before)]  # what the template writes when no system message is given
    if head:
        if not (head.startswith(system_before) and head.endswith(system_after)
                and len(head) >= len(system_before) + len(system_after)):
            return None
        pieces["default_system"] = head[len(system_before):len(head) - len(system_after)]
    return pieces


def go_template(p: dict) -> str:
    """Ollama's TEMPLATE from chat_pieces (no whitespace-trimming actions: the pieces' own newlines must stay)."""
    return ("{{ if .System }}" + p["system_before"] + "{{ .System }}" + p["system_after"] + "{{ end }}"
            "{{ range .Messages }}{{ if eq .Role \"user\" }}" + p["user_before"] + "{{ .Content }}" + p["user_after"]
            + "{{ else if eq .Role \"assistant\" }}" + p["assistant_before"] + "{{ .Content }}" + p["assistant_after"]
            + "{{ end }}{{ end }}" + p["generation"])


def render_like_ollama(p: dict, messages: list[dict], system: Optional[str]) -> str:
    """What go_template(p) renders for `messages` with SYSTEM `system` (for the check)."""
    out = p["system_before"] + system + p["system_after"] if system else ""
    for m in messages:
        out += p[f"{m['role']}_before"] + m["content"] + p[f"{m['role']}_after"]
    return out + p["generation"]


def modelfile(gguf_name: str, tokenizer, template: Optional[str], stops: list[str]) -> tuple[str, str]:
    """(the Modelfile's text, a line on its TEMPLATE): FROM the GGUF file, TEMPLATE and SYSTEM read off the chat template
    (checked on three conversations), and a stop for each end-of-turn / end-of-text token."""
    lines = [f"FROM ./{gguf_name}"]
    said = "no chat template: Ollama sends the prompt as it is (TEMPLATE {{ .Prompt }})"
    if template:
        def render(messages, generation_prompt):
            return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                 add_generation_prompt=generation_prompt)

        pieces = chat_pieces(render)
        if pieces is not None and _same_rendering(pieces, render):
            lines.append(f'TEMPLATE """{go_template(pieces)}"""')
            if pieces["default_system"]:
                lines.append(f'SYSTEM """{pieces["default_system"]}"""')
            said = "TEMPLATE read off the chat template; the same text as the template renders on three conversations"
        else:
            said = ("the chat template's turns do not come apart into Ollama's TEMPLATE: none written (write one by hand, "
                    "or use llama.cpp, which reads the chat template from the GGUF file)")
    else:
        lines.append('TEMPLATE """{{ .Prompt }}"""')
    lines += [f'PARAMETER stop "{s}"' for s in dict.fromkeys(stops) if s]
    return "\n".join(lines) + "\n", said


def _same_rendering(pieces: dict, render) -> bool:
    conversations = [(None, [{"role": "user", "content": "Hello there"}]),
                     ("Be brief.", [{"role": "user", "content": "Hi"}]),
                     ("Be brief.", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                    {"role": "user", "content": "How are you?"}])]
    for system, messages in conversations:
        given = ([{"role": "system", "content": system}] if system else []) + messages
        expected = render(given, True)
        if render_like_ollama(pieces, messages, system or pieces["default_system"]) != expected:
            return False
    return True


def vllm_check(adapter: dict, base: str, adapter_dir: str, name: str) -> dict:
    """Whether vLLM's LoRA loader takes this peft adapter (LoRA only; no DoRA, no bias, no modules_to_save; its
    target modules among the Llama family's projections; the rank within --max-lora-rank), and the command."""
    problems = []
    if adapter.get("peft_type") != "LORA":
        problems.append(f"a {adapter.get('peft_type')} adapter: vLLM serves LoRA adapters only")
    if adapter.get("use_dora"):
        problems.append("DoRA: vLLM does not support it")
    if adapter.get("modules_to_save"):
        problems.append(f"modules_to_save {adapter['modules_to_save']}: vLLM takes none")
    if adapter.get("bias", "none") != "none":
        problems.append(f"bias={adapter['bias']}: vLLM takes bias=none")
    targets = adapter.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    unknown = sorted({t.rsplit(".", 1)[-1] for t in targets} - VLLM_MODULES)  # peft may list full module paths
    if unknown:
        problems.append(f"target modules {unknown}: vLLM's Llama-family LoRA covers {', '.join(sorted(VLLM_MODULES))}")
    r = adapter.get("r") or 0
    rank = next((v for v in VLLM_RANKS if v >= r), None)
    if rank is None:
        problems.append(f"rank {r} is above vLLM's largest --max-lora-rank ({VLLM_RANKS[-1]})")
    command = (f"vllm serve {base} --enable-lora --lora-modules {name}={adapter_dir}"
               + (f" --max-lora-rank {rank}" if rank and rank > 16 else ""))
    return {"fits": not problems, "problems": problems, "command": command if not problems else None}
