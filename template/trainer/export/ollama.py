"""An Ollama Modelfile for a GGUF export: FROM the file, the model's chat template translated
into Ollama's template language, the stop sequences of that template, the generation defaults
of evaluation.generation, and the system prompt the model expects.

The translation is never a guess. Each family below (ChatML, Llama 3, Mistral, OLMo 2 / Tulu)
is an Ollama template; the tokenizer's own chat template and the family's are rendered for the
same conversations (a system message, several turns, none) and must give the same text, with
the BOS that llama.cpp adds itself left out (trainer.export.go_template renders Go templates as
Ollama does). A template no family reproduces is refused with the list. When the tokenizer's
template adds a default system prompt to conversations without one (SmolLM2 does), the
Modelfile's SYSTEM carries it, which Ollama inserts in the same place.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from trainer.data.training_data import messages_of, read_records
from trainer.errors import ProjectError
from trainer.export.go_template import TemplateError, render


class ModelfileError(ProjectError):
    kind = "modelfile_error"


@dataclass(frozen=True)
class Family:
    template: str  # an Ollama (Go) template; EOS stands for the tokenizer's end-of-sequence text
    stop: tuple[str, ...]


FAMILIES = {
    "chatml": Family('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
                     '{{ end }}<|im_start|>assistant\n', ("<|im_start|>", "<|im_end|>")),
    "llama3": Family('{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
                     '{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n',
                     ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "mistral": Family('{{- range .Messages }}{{ if eq .Role "user" }}[INST] {{ .Content }} [/INST]'
                      '{{ else if eq .Role "assistant" }}{{ .Content }}EOS{{ end }}{{ end }}',
                      ("[INST]", "[/INST]", "EOS")),
    "mistral-spaced": Family('{{- range .Messages }}{{ if eq .Role "user" }}[INST] {{ .Content }} [/INST]'
                             '{{ else if eq .Role "assistant" }}{{ .Content }}EOS {{ end }}{{ end }}',
                             ("[INST]", "[/INST]", "EOS")),
    "olmo2": Family('{{- range .Messages }}{{ if eq .Role "system" }}<|system|>\n{{ .Content }}\n'
                    '{{ else if eq .Role "user" }}<|user|>\n{{ .Content }}\n'
                    '{{ else if eq .Role "assistant" }}<|assistant|>\n{{ .Content }}EOS\n{{ end }}{{ end }}'
                    '<|assistant|>\n', ("<|user|>", "<|system|>", "<|assistant|>", "EOS")),
}
SYSTEM, USER, ANSWER, AGAIN = ("You answer in one short sentence.", "What is the capital of France?",
                               "Paris is the capital of France.", "And of Italy?")
PROBES = {  # the conversations both renderings must agree on
    "system, user, assistant, user": [("system", SYSTEM), ("user", USER), ("assistant", ANSWER), ("user", AGAIN)],
    "user, assistant, user": [("user", USER), ("assistant", ANSWER), ("user", AGAIN)],
    "user": [("user", USER)],
}
MARK = "\x00system\x00"
PARAMETERS = {"num_ctx": int, "repeat_last_n": int, "repeat_penalty": float, "temperature": float, "seed": int,
              "stop": str, "num_predict": int, "top_k": int, "top_p": float, "min_p": float}


@dataclass
class Translation:
    family: str
    template: str
    stop: list[str]
    default_system: Optional[str]
    checked: list[str]


def _hf(tokenizer: Any, messages: list[tuple[str, str]]) -> Optional[str]:
    """The tokenizer's own rendering with the generation prompt; None if its template refuses it."""
    try:
        return tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - templates raise their own errors (roles must alternate...)
        return None


def _go(template: str, messages: list[tuple[str, str]]) -> str:
    return render(template, {"Messages": [{"Role": r, "Content": c} for r, c in messages],
                             "System": next((c for r, c in messages if r == "system"), ""), "Prompt": "",
                             "Response": ""})


def translate(tokenizer: Any, bos_added: bool) -> Translation:
    """The Ollama template that renders what the tokenizer's chat template renders, with its stop
    sequences and the default system prompt the tokenizer's template adds (if any). `bos_added`:
    whether llama.cpp puts the BOS token before the prompt itself (the GGUF's add_bos_token)."""
    source = getattr(tokenizer, "chat_template", None)
    if not source:
        raise ModelfileError("the tokenizer has no chat template, so there is none to translate for Ollama")
    eos, bos = tokenizer.eos_token or "", tokenizer.bos_token or ""
    expected = {name: _hf(tokenizer, messages) for name, messages in PROBES.items()}
    if expected["user"] is None:
        raise ModelfileError("the tokenizer's chat template cannot render one user message")
    writes_bos = bool(bos) and "bos_token" in source and expected["user"].startswith(bos)
    lead = bos if writes_bos and bos_added else ""  # llama.cpp adds it before the rendered text
    marked = _hf(tokenizer, [("system", MARK), ("user", USER)])
    for name, family in FAMILIES.items():
        template = family.template.replace("EOS", eos)
        if writes_bos and not bos_added:
            template = bos + template  # llama.cpp does not add it: the template writes it, as the tokenizer's does
        try:
            found = {probe: lead + _go(template, PROBES[probe]) for probe, text in expected.items() if text is not None}
        except TemplateError:
            continue
        default = None
        if found["user"] != expected["user"] and marked and MARK in marked:  # a default system prompt?
            before, after = marked.split(MARK, 1)
            text = expected["user"]
            if text.startswith(before) and text.endswith(after) and len(text) >= len(before) + len(after):
                default = text[len(before):len(text) - len(after)]
                found["user"] = lead + _go(template, [("system", default), ("user", USER)])
                if "user, assistant, user" in found:
                    found["user, assistant, user"] = lead + _go(
                        template, [("system", default)] + PROBES["user, assistant, user"])
        if all(found[probe] == text for probe, text in expected.items() if text is not None):
            return Translation(name, template, [s.replace("EOS", eos) for s in family.stop if s.replace("EOS", eos)],
                               default, [probe for probe, text in expected.items() if text is not None])
    raise ModelfileError("the model's chat template is none this export can translate for Ollama (ChatML, "
                         "Llama 3, Mistral, OLMo 2 / Tulu); no Modelfile is written rather than a guessed one. "
                         "Use the GGUF with llama.cpp, whose chat mode reads the template from the file",
                         details={"families": sorted(FAMILIES)})


def training_system_prompt(train_file: Path) -> Optional[str]:
    """The system message every training row starts with, if they all share one (the model
    learned to answer after it)."""
    if not train_file.is_file():
        return None
    prompts = {m[0]["content"] if m and m[0]["role"] == "system" else None
               for m in map(messages_of, read_records(train_file))}
    return prompts.pop() if len(prompts) == 1 else None


def _quoted(text: str) -> str:
    if '"""' in text:
        raise ModelfileError('a Modelfile value cannot hold """; the system prompt or template contains it')
    return f'"""{text}"""'


def modelfile(gguf_name: str, translation: Translation, generation: dict[str, Any], context: int,
              system: Optional[str]) -> str:
    """The Modelfile text (FROM a path relative to the Modelfile, as Ollama resolves it)."""
    lines = [f"FROM ./{gguf_name}", f"TEMPLATE {_quoted(translation.template)}"]
    system = system if system is not None else translation.default_system
    if system:
        lines.append(f"SYSTEM {_quoted(system)}")
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in translation.stop]
    lines += [f"PARAMETER temperature {float(generation.get('temperature', 0.0)):g}",
              f"PARAMETER top_p {float(generation.get('top_p', 1.0)):g}",
              f"PARAMETER num_predict {int(generation.get('max_tokens', 256))}", f"PARAMETER num_ctx {context}"]
    return "\n".join(lines) + "\n"


def parse(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, argument) pairs of a Modelfile, by Ollama's grammar (parser/parser.go): an
    instruction word, then a bare, "quoted" or \"\"\"multi-line\"\"\" argument; PARAMETER takes a
    name and a value of that parameter's type. Raises ModelfileError where Ollama would."""
    found: list[tuple[str, str]] = []
    position = 0
    pattern = re.compile(r'[ \t]*(?:#[^\n]*)?\n|[ \t]*([A-Za-z]+)[ \t]+("""(.*?)"""|"((?:[^"\\\n]|\\.)*)"|([^\n]*))'
                         r'[ \t]*(?:\n|$)', re.DOTALL)
    while position < len(text):
        match = pattern.match(text, position)
        if not match or match.end() == position:
            raise ModelfileError(f"Modelfile: cannot read line {text.count(chr(10), 0, position) + 1}")
        position = match.end()
        if match.group(1) is None:
            continue
        word = match.group(1).upper()
        value = match.group(3) if match.group(3) is not None else (
            json.loads(f'"{match.group(4)}"') if match.group(4) is not None else match.group(5).strip())
        if word not in ("FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE", "REQUIRES"):
            raise ModelfileError(f"Modelfile: unknown instruction {word}")
        if word == "PARAMETER":
            name, _, raw = value.partition(" ")
            if name not in PARAMETERS:
                raise ModelfileError(f"Modelfile: unknown parameter {name}")
            raw = raw.strip()
            kind = PARAMETERS[name]
            try:
                value = f"{name} {json.loads(raw) if kind is str and raw.startswith(chr(34)) else kind(raw)}"
            except ValueError:
                raise ModelfileError(f"Modelfile: {name} takes a {kind.__name__}, got {raw}") from None
        found.append((word, value))
    if [w for w, _ in found].count("FROM") != 1:
        raise ModelfileError("Modelfile: exactly one FROM is required")
    for word, value in found:
        if word == "TEMPLATE":
            _go(value, list(PROBES["user"]))  # Ollama parses the template when the model is created
    return found
