"""How a recipe's YAML and `section.key=value` overrides become typed config values: type coercion, the problems
each key can have (an unknown key with the one it most likely meant, a value of the wrong type), and the listing of
every key with its type, default and help. Works on any tree of dataclasses; config.py passes its own `Config`."""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Optional, Union

import yaml

from peft_tuner.errors import PeftTunerError


class ConfigError(PeftTunerError):
    """A recipe or override the user wrote is wrong; the message says what to change."""


def parse_override(item: str) -> tuple[str, Any]:
    """`section.key=value` as (key, value), the value read as YAML (so 1e-3, true, [a, b] and {a: b} are typed); an
    empty value is null. A value YAML cannot read is one ConfigError naming the key and how to quote it."""
    if "=" not in item:
        raise ConfigError(f"override '{item}': write it as section.key=value, e.g. train.epochs=1")
    key, value = (part.strip() for part in item.split("=", 1))
    if not value:
        return key, None
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as e:
        problem = str(getattr(e, "problem", None) or e).splitlines()[0]
        escaped = value.replace("'", "''")
        raise ConfigError(f"override {key}: the value {value!r} is not valid YAML ({problem}). Quote the value so that "
                          f"YAML reads it as text; on the shell: \"{key}='{escaped}'\"") from e


def flat_keys(root, raw: dict, prefix: str = "") -> list[str]:
    """The dotted keys a recipe mapping writes."""
    keys = []
    for key, value in raw.items():
        if isinstance(value, dict) and prefix == "" and key in {f.name for f in dataclasses.fields(root)}:
            keys += flat_keys(root, value, f"{key}.")
        else:
            keys.append(prefix + str(key))
    return keys


def set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def all_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            keys += all_keys(f.default_factory, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def described_keys(root, section: Optional[str] = None) -> list[tuple[str, Optional[str], str, str, str]]:
    """(section, key, type, default as YAML writes it, help) of every key, in the dataclasses' order; section None for
    the top-level keys."""
    sections = {f.name: f for f in dataclasses.fields(root)}
    if section is not None and section not in sections:
        close = difflib.get_close_matches(section, list(sections), n=1)
        raise ConfigError(f"config {section}: no such section{f'; did you mean {close[0]}?' if close else ''} "
                          f"(sections: {', '.join(sections)})")
    keys = []
    for name, f in sections.items():
        if section is not None and name != section:
            continue
        nested = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        fields = [(name, g, nested) for g in dataclasses.fields(nested)] if dataclasses.is_dataclass(nested) \
            else [(None, f, root)]
        for owner_name, g, owner in fields:
            default = g.default_factory() if g.default_factory is not dataclasses.MISSING else g.default
            shown = yaml.safe_dump(default, default_flow_style=True, allow_unicode=True).strip().removesuffix("...").strip()
            keys.append((owner_name, g.name, type_name(typing.get_type_hints(owner)[g.name]), shown,
                         g.metadata.get("help", "")))
    return keys


def describe(root, section: Optional[str] = None) -> str:
    """Every key (of one section), with its type, default and help, read from the dataclasses themselves."""
    lines = []
    for owner, key, kind, default, text in described_keys(root, section):
        lines += [f"{owner + '.' if owner else ''}{key}: {kind} = {default}", f"    {text}"]
    return "\n".join(lines)


def describe_markdown(root, intro: str) -> str:
    """The configuration reference page: one table per section."""
    out, current = [intro.rstrip(), ""], object()
    for owner, key, kind, default, text in described_keys(root):
        if owner != current:
            current = owner
            out += ["", f"## {owner or 'top level'}", "", "| key | type | default | what it does |", "|---|---|---|---|"]
        cell = text.replace("|", "\\|")
        out.append(f"| `{owner + '.' if owner else ''}{key}` | {kind} | `{default}` | {cell} |")
    return "\n".join(out).replace("\n\n\n", "\n\n") + "\n"


# Names other tools use for our keys.
ALIASES = {"lr": "learning_rate", "num_epochs": "epochs", "num_train_epochs": "epochs", "bs": "batch_size",
           "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "gradient_accumulation",
           "grad_accum": "gradient_accumulation", "lora_r": "r", "rank": "r", "lora_alpha": "alpha",
           "lora_dropout": "dropout", "model_name_or_path": "name_or_path", "torch_dtype": "dtype",
           "max_seq_length": "max_length", "warmup": "warmup_ratio", "save_steps": "checkpoint_steps"}


def suggest_key(root, dotted: str) -> Optional[str]:
    """The known key a typo most likely meant: an alias, an abbreviation (lr -> learning_rate), or a close spelling."""
    keys = all_keys(root)
    section, _, name = dotted.rpartition(".")
    same_section = [k for k in keys if k.rpartition(".")[0] == section]
    if name in ALIASES and f"{section}.{ALIASES[name]}".lstrip(".") in keys:
        return f"{section}.{ALIASES[name]}".lstrip(".")

    def initials(key: str) -> str:
        return "".join(part[0] for part in key.rpartition(".")[2].split("_"))

    abbreviations = [k for k in same_section if len(name) >= 2 and initials(k) == name]
    if len(abbreviations) == 1:
        return abbreviations[0]
    close = difflib.get_close_matches(dotted, same_section or keys, n=1, cutoff=0.6) or \
        difflib.get_close_matches(dotted, keys, n=1, cutoff=0.6)
    return close[0] if close else None


def build(cls, raw: Any, prefix: str, problems: list[str], root=None):
    """An instance of dataclass `cls` from a mapping; each problem (unknown key, wrong type) added to `problems`."""
    root = root or cls
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        dotted = prefix + str(key)
        if key not in fields:
            close = suggest_key(root, dotted)
            hint = f": did you mean {close}?" if close else f"; known keys here: {', '.join(fields)}"
            problems.append(f"{dotted}: unknown key{hint}")
            continue
        f = fields[key]
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            kwargs[key] = build(f.default_factory, value or {}, dotted + ".", problems, root)
        else:
            ok, converted = coerce(value, hints[key])
            if ok:
                kwargs[key] = converted
            else:
                problems.append(f"{dotted}: expected {type_name(hints[key])}, got {value!r}")
    return cls(**kwargs)


def coerce(value: Any, hint) -> tuple[bool, Any]:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(hint):
            ok, v = coerce(value, arg)
            if ok:
                return True, v
        return False, None
    if hint is type(None):
        return value is None, None
    if origin is list:
        if isinstance(value, str):
            value = [value] if "," not in value else [v.strip() for v in value.split(",")]
        if not isinstance(value, list):
            return False, None
        (arg,) = typing.get_args(hint)
        out = [coerce(v, arg) for v in value]
        return all(ok for ok, _ in out), [v for _, v in out]
    if origin is dict:
        return isinstance(value, dict), {str(k): str(v) for k, v in (value or {}).items()} if isinstance(value, dict) else None
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, None
        return isinstance(value, (int, float)) and not isinstance(value, bool), float(value) if isinstance(value, (int, float)) else None
    if hint is str:
        return isinstance(value, (str, int, float)) and not isinstance(value, bool), str(value)
    return True, value


def type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is list:
        return f"a list of {type_name(typing.get_args(hint)[0])}"
    if origin is dict:
        return "a mapping"
    return getattr(hint, "__name__", str(hint))
