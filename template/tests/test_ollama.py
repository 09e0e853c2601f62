"""The Ollama Modelfile: Go templates rendered as Go renders them, each model family's chat
template translated so Ollama renders what the tokenizer renders (a test compares them for a
multi-turn conversation with a system message), templates no family reproduces refused, and
Modelfiles checked against Ollama's grammar."""

from __future__ import annotations

import pytest

from trainer.export import ollama
from trainer.export.go_template import TemplateError, render

# The chat templates of the model families, as their tokenizers ship them
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>"
           "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
           + CHATML.removeprefix("{% for message in messages %}"))
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>'"
          " + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if "
          "loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if "
          "add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role']"
           " == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and "
           "assistant roles are supported!') }}{% endif %}{% endfor %}")
OLMO2 = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>\n' + "
         "message['content'] + '\n' }}{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + "
         "'\n' }}{% elif message['role'] == 'assistant' %}{% if not loop.last %}{{ '<|assistant|>\n'  + "
         "message['content'] + eos_token + '\n' }}{% else %}{{ '<|assistant|>\n'  + message['content'] + eos_token }}"
         "{% endif %}{% endif %}{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
         "{% endfor %}")
ZEPHYR = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
CONVERSATION = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "Name a river."}]


def test_go_templates_render_as_go_renders_them():
    data = {"Messages": [{"Role": "user", "Content": "a"}, {"Role": "assistant", "Content": "b"},
                         {"Role": "user", "Content": "c"}], "System": "s"}
    # {{- and -}} trim the whitespace beside them, newlines included
    assert render("x  \n {{- .System -}}  \n y", data) == "xsy"
    assert render('{{ range $i, $m := .Messages }}{{ $i }}{{ $m.Role }}{{ if eq .Role "user" }}U{{ else if '
                  'eq .Role "assistant" }}A{{ else }}?{{ end }};{{ end }}', data) == "0userU;1assistantA;2userU;"
    # slice $.Messages $i is Go's Messages[i:]: the last message is the one whose tail has length 1
    assert render("{{ range $i, $_ := .Messages }}{{ if eq (len (slice $.Messages $i)) 1 }}{{ .Content }}{{ end }}"
                  "{{ end }}", data) == "c"
    assert render('{{ range .Messages }}{{ if eq .Role "assistant" }}{{ break }}{{ end }}{{ .Content }}{{ end }}',
                  data) == "a"
    assert render('{{ $x := "0" }}{{ range .Messages }}{{ $x = .Content }}{{ end }}{{ $x }}', data) == "c"
    assert render("{{ if and .System (not .Missing) }}yes{{ end }}", {**data, "Missing": ""}) == "yes"
    for bad in ("{{ if .System }}open", "{{ end }}", "{{ with .System }}{{ end }}", "{{ .System | printf }}"):
        with pytest.raises(TemplateError):
            render(bad, data)


@pytest.fixture
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny)


@pytest.mark.parametrize(("template", "family", "bos", "eos"), [
    (CHATML, "chatml", None, None), (SMOLLM2, "chatml", None, None),
    (LLAMA3, "llama3", "<|begin_of_text|>", "<|eot_id|>"), (MISTRAL, "mistral", "<s>", "</s>"),
    (OLMO2, "olmo2", "<|endoftext|>", "<|endoftext|>")])
@pytest.mark.parametrize("bos_added", [True, False])
def test_each_family_renders_in_ollama_what_the_tokenizer_renders(tokenizer, template, family, bos, eos, bos_added):
    tokenizer.add_special_tokens({k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v})
    tokenizer.chat_template = template
    translation = ollama.translate(tokenizer, bos_added)
    assert translation.family == family
    conversations = [CONVERSATION, CONVERSATION[1:], CONVERSATION[1:2]]
    if family == "mistral":  # its template takes no system message
        conversations = conversations[1:]
    for messages in conversations:
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        system = translation.default_system if messages[0]["role"] != "system" else None
        given = ([{"Role": "system", "Content": system}] if system else []) + [
            {"Role": m["role"], "Content": m["content"]} for m in messages]  # Ollama adds SYSTEM as a message
        got = render(translation.template, {"Messages": given, "System": system or ""})
        lead = bos if bos and bos_added and "bos_token" in template else ""  # llama.cpp adds the BOS itself
        assert lead + got == expected, (family, messages)
    assert (translation.default_system is not None) == (template == SMOLLM2)
    text = ollama.modelfile("m.gguf", translation, {"temperature": 0.2, "top_p": 0.9, "max_tokens": 64}, 1024, None)
    parsed = ollama.parse(text)
    assert ("FROM", "./m.gguf") in parsed and ("TEMPLATE", translation.template) in parsed
    stops = [v.split(" ", 1)[1] for k, v in parsed if k == "PARAMETER" and v.startswith("stop ")]
    assert stops == translation.stop and (eos or "<|im_end|>") in stops
    assert ("PARAMETER", "temperature 0.2") in parsed and ("PARAMETER", "num_predict 64") in parsed


def test_a_template_no_family_reproduces_is_refused_with_the_list(tokenizer):
    tokenizer.chat_template = ZEPHYR
    with pytest.raises(ollama.ModelfileError, match="ChatML, Llama 3, Mistral, OLMo 2") as caught:
        ollama.translate(tokenizer, False)
    assert caught.value.details["families"] == sorted(ollama.FAMILIES)
    tokenizer.chat_template = None
    with pytest.raises(ollama.ModelfileError, match="no chat template"):
        ollama.translate(tokenizer, False)


def test_the_system_prompt_and_the_grammar(tokenizer, tmp_path):
    tokenizer.chat_template = CHATML
    translation = ollama.translate(tokenizer, False)
    text = ollama.modelfile("m.gguf", translation, {}, 2048, "Be terse.\nAlways.")
    assert ('SYSTEM', "Be terse.\nAlways.") in ollama.parse(text)
    with pytest.raises(ollama.ModelfileError, match='"""'):
        ollama.modelfile("m.gguf", translation, {}, 2048, 'say """ this')
    for bad, why in (("PARAMETER temperature 0.1\n", "exactly one FROM"), ("FROM a\nFROB b\n", "unknown instruction"),
                     ("FROM a\nPARAMETER warmth 1\n", "unknown parameter"),
                     ("FROM a\nPARAMETER num_ctx lots\n", "num_ctx takes a int"),
                     ('FROM a\nTEMPLATE """{{ if .System }}"""\n', "not closed")):
        with pytest.raises((ollama.ModelfileError, TemplateError), match=why):
            ollama.parse(bad)
    rows = tmp_path / "train.jsonl"
    rows.write_text('{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}]}\n' * 2)
    assert ollama.training_system_prompt(rows) == "S"
    rows.write_text(rows.read_text() + '{"messages": [{"role": "user", "content": "u"}]}\n')
    assert ollama.training_system_prompt(rows) is None
