"""Check a GGUF export in llama.cpp (llama-cpp-python), in a child process.

The check answers a chat prompt with the GGUF's greedy decoding and with the merged Hugging
Face model it was converted from, and reports whether the texts agree, whether llama.cpp
stopped at the end-of-turn token (and counts that token as an end of generation), how often
llama.cpp's top token agrees with the merged model's greedy tokens when fed them (the measure
for quantized types, whose free-running text may part ways after a near tie), and whether the
GGUF's own chat template (what llama.cpp's chat mode renders) gives the prompt's very tokens.
llama.cpp runs in a child process because a llama.cpp built
for the host CPU can die outright on some CPUs (SIGILL or a segfault in its CPU weight
repacking, seen with AMX on Intel Sapphire Rapids and later): the export then reports the crash
and what to do, instead of dying with it. After such a crash the check is retried with the
repacking turned off (`use_extra_bufts = False`), which tells a broken build from a broken file.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

PROMPT = "What is the capital of France? Answer in one sentence."
REBUILD = ('CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --force-reinstall --no-cache-dir --no-deps '
           'llama-cpp-python')
TIMEOUT = 600


class LoaderError(RuntimeError):
    """llama.cpp refused the file (an error, not a crash): the GGUF itself is wrong."""


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def decode(file: Path, prompt_ids: list[int], max_tokens: int, repack: bool = True,
           command: Optional[list[str]] = None, teacher: Optional[list[int]] = None,
           messages: Optional[list[dict[str, str]]] = None) -> dict[str, Any]:
    """Greedy decoding of `prompt_ids` by llama.cpp in a child process: {"tokens", "stopped",
    "version"}, or {"crashed": signal name} when the child died of a signal. With `teacher` (a
    token sequence) also llama.cpp's top token after each of its prefixes ("top", one fewer than
    the sequence); with `messages` also the prompt its own chat template renders."""
    file = file.resolve()  # the child runs in the file's folder
    child = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    argv = (command or [sys.executable, "-c", child, __file__]) + [str(file), str(max_tokens), "1" if repack else "0"]
    try:
        request = {"prompt": prompt_ids, "teacher": teacher or [], "messages": messages or []}
        out = subprocess.run(argv, input=json.dumps(request), capture_output=True, text=True, timeout=TIMEOUT,
                             cwd=file.parent)
    except subprocess.TimeoutExpired:
        return {"crashed": f"no answer within {TIMEOUT} s"}
    if out.returncode < 0:
        try:
            name = signal.Signals(-out.returncode).name
        except ValueError:
            name = f"signal {-out.returncode}"
        return {"crashed": name, "stderr": out.stderr[-2000:]}
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise LoaderError(f"llama.cpp could not run {file.name} (exit {out.returncode}): "
                          f"{(out.stderr or out.stdout).strip()[-1500:]}")
    return json.loads(lines[-1])


def reference(model_dir: Path, tokenizer: Any, prompt_ids: list[int], max_tokens: int
              ) -> tuple[list[int], bool, list[int], list[int]]:
    """Greedy tokens of the merged Hugging Face model up to its end of turn (the same end-of-turn
    tokens the project's engines stop at), whether it got there, the whole sequence (prompt,
    answer, end of turn) and its top token after each prefix of it (teacher-forced)."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.engines.base_trainer import end_of_turn_ids  # here: the child process runs without the project

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    model.eval()
    ends = set(end_of_turn_ids(tokenizer, model.generation_config.eos_token_id))
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=sorted(ends), pad_token_id=sorted(ends)[0])
    tokens = out[0, len(prompt_ids):].tolist()
    stop = next((i for i, t in enumerate(tokens) if t in ends), None)
    sequence = prompt_ids + (tokens if stop is None else tokens[:stop + 1])
    with torch.no_grad():
        top = model(torch.tensor([sequence])).logits[0, :-1].argmax(-1).tolist()
    return (tokens if stop is None else tokens[:stop]), stop is not None, sequence, top


def verify(file: Path, model_dir: Path, max_tokens: int = 64, command: Optional[list[str]] = None) -> dict[str, Any]:
    """The export's llama.cpp check (see the module's docstring). Never raises for a crash of
    llama.cpp; raises LoaderError when llama.cpp rejects the file."""
    if command is None and not available():
        return {"checked": False, "reason": "llama-cpp-python is not installed (pip install llama-cpp-python)"}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": PROMPT}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"]
    result: dict[str, Any] = {"checked": True, "prompt": PROMPT, "max_tokens": max_tokens}
    expected, ended, sequence, top = reference(model_dir, tokenizer, ids, max_tokens)
    answer = decode(file, ids, max_tokens, True, command, sequence, messages)
    if "crashed" in answer:
        result["crash"] = {
            "signal": answer["crashed"], "with": "llama.cpp's CPU weight repacking on (its default)",
            "stderr": answer.get("stderr", "")[-500:],
            "advice": "this llama-cpp-python was built for a CPU feature its kernels then crash on (AMX on Intel "
                      f"Sapphire Rapids and later is the known case); rebuild it portable: {REBUILD}; or load "
                      "with Llama(..., use_extra_bufts=False) where the library allows it"}
        answer = decode(file, ids, max_tokens, False, command, sequence, messages)
        if "crashed" in answer:
            result.update(checked=False, reason=f"llama.cpp crashed ({answer['crashed']}) with repacking on and "
                                                f"off; the file is unverified: {result['crash']['advice']}")
            return result
        result["crash"]["retried"] = "works with repacking off (use_extra_bufts=False): the file is fine"
    got = answer["tokens"]
    # the end of the turn counts as a token: both ending at once is agreement
    mine, theirs = got + ["end"] * answer["stopped"], expected + ["end"] * ended
    result.update(
        llama_cpp_version=answer.get("version"), llama_cpp_text=tokenizer.decode(got),
        transformers_text=tokenizer.decode(expected), same_greedy_text=mine == theirs,
        same_first_token=mine[:1] == theirs[:1], stopped_at_end_of_turn=answer["stopped"],
        transformers_stopped=ended, end_of_turn=answer.get("end_token"),
        # both engines' top token at every position of the prompt and the merged model's answer (teacher-
        # forced): how far a quantized file agrees, past the first divergence of free-running greedy text
        top1_agreement=round(sum(a == b for a, b in zip(answer.get("top", []), top, strict=False)) / len(top), 4),
        agreement_positions=len(top),
        end_of_turn_is_end_of_generation=answer.get("eot_is_eog"), end_of_turn_token=answer.get("eot_text"))
    if ended and not answer["stopped"]:
        result["warning"] = (f"llama.cpp did not end the turn within {max_tokens} tokens where the merged model "
                             "did: this type changes the model's answers; prefer a larger one (q4_k_m and up)")
    if answer.get("template_prompt") is not None:  # the GGUF's own chat template, as llama.cpp's chat mode uses it
        result["gguf_chat_template_matches"] = answer["template_prompt"] == ids
    return result


def _child(file: str, max_tokens: int, repack: bool) -> None:
    """In the child: load, decode greedily, print one JSON line."""
    import llama_cpp

    request = json.loads(sys.stdin.read())
    prompt, teacher = request["prompt"], request["teacher"]
    kwargs: dict[str, Any] = {"model_path": file, "n_ctx": len(prompt) + max_tokens + 8, "verbose": False,
                              "n_threads": 2, "logits_all": bool(teacher)}
    llm = llama_cpp.Llama(**kwargs) if repack else _without_repacking(llama_cpp, kwargs)
    vocab = llama_cpp.llama_model_get_vocab(llm.model) if hasattr(llama_cpp, "llama_model_get_vocab") else None
    tokens: list[int] = []
    stopped, end = False, None
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        if (llama_cpp.llama_vocab_is_eog(vocab, token) if vocab is not None else token == llm.token_eos()):
            stopped, end = True, llm.detokenize([token], special=True).decode(errors="replace")
            break
        tokens.append(int(token))
        if len(tokens) >= max_tokens:
            break
    found: dict[str, Any] = {"tokens": tokens, "stopped": stopped, "end_token": end, "version": llama_cpp.__version__}
    if teacher:  # fed whole: llama.cpp's top token after each prefix
        llm.reset()
        llm.eval(teacher[:-1])
        found["top"] = [int(row.argmax()) for row in llm.scores[:len(teacher) - 1]]
    if vocab is not None:
        eot = llama_cpp.llama_vocab_eot(vocab)
        if eot >= 0:
            found.update(eot_is_eog=bool(llama_cpp.llama_vocab_is_eog(vocab, eot)),
                         eot_text=llm.detokenize([eot], special=True).decode(errors="replace"))
    template = llm.metadata.get("tokenizer.chat_template")
    if template and request["messages"]:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        names = {"bos": llama_cpp.llama_vocab_bos, "eos": llama_cpp.llama_vocab_eos}
        text = {k: llm.detokenize([f(vocab)], special=True).decode() if vocab is not None and f(vocab) >= 0 else ""
                for k, f in names.items()}
        formatted = Jinja2ChatFormatter(template, eos_token=text["eos"], bos_token=text["bos"],
                                        add_generation_prompt=True)(messages=request["messages"])
        add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true"
        found["template_prompt"] = llm.tokenize(formatted.prompt.encode(), add_bos=add_bos, special=True)
    print(json.dumps(found))


def _without_repacking(llama_cpp: Any, kwargs: dict[str, Any]) -> Any:
    """A Llama whose CPU weight repacking (extra buffer types) is off: llama-cpp-python has no
    argument for it, so the default model parameters its constructor starts from are changed."""
    bindings = llama_cpp.llama_cpp
    original = bindings.llama_model_default_params

    def params():
        value = original()
        value.use_extra_bufts = False
        return value

    bindings.llama_model_default_params = params
    try:
        return llama_cpp.Llama(**kwargs)
    finally:
        bindings.llama_model_default_params = original


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1")
