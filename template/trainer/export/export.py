"""Export a trained stage of a run for deployment.

Formats (each written as a folder with a model card, README.md):
    adapters     the LoRA adapter in peft's format (peft/) and in mlx-lm's (mlx/), whichever trained it
    safetensors  adapter merged into the base model: a Hugging Face model directory
                 (training.fine_tune full: the trained model itself in each format; no adapters format)
    huggingface  the same, meant for the Hub (merge_adapters false: the peft adapter alone)
    mlx          fused with mlx-lm, optionally quantized q4/q8 (merge_adapters false: the mlx adapter)
    gguf         the merged model as one GGUF file, f32/f16/q8_0 (llama.cpp, Ollama, LM Studio)

The export is built in a temporary folder beside its destination and moved into place when
complete, so a failed export leaves nothing behind and an existing one is replaced only when
`overwrite` is asked.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Optional

from trainer.config import EXPORT_FORMATS, FineTuningConfig
from trainer.export import export_target, gguf_check, gguf_export, gguf_quantize, hub, model_card, ollama
from trainer.files import TEMP_PREFIX, write_atomic
from trainer.models.gguf_support import architecture, check_planned  # noqa: F401  (re-exported, they were here)
from trainer.models.merge import MLX_BITS, ExportError, adapter_into, fuse_mlx, merge_hf, model_type
from trainer.runs.training_run_manager import RunError, RunManager, now, stage_output

MLX_QUANTIZATIONS = ("none", *MLX_BITS)  # gguf's: gguf_export.check (ours and llama.cpp's quantizer's)


def usage(fmt: str, path: Path, merged: bool, base: str, gguf_file: Optional[str] = None, modelfile: bool = False,
          name: str = "my-model") -> str:
    if fmt == "adapters" or (fmt in ("safetensors", "huggingface") and not merged):
        return (f"transformers + peft:\n    from peft import PeftModel\n    from transformers import "
                f"AutoModelForCausalLM\n    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("
                f"'{base}'), '{path / 'peft' if fmt == 'adapters' else path}')\n"
                + (f"mlx-lm:\n    mlx_lm.generate --model {base} --adapter-path {path / 'mlx'} --prompt 'Hello'\n"
                   if fmt == "adapters" else ""))
    if fmt in ("safetensors", "huggingface"):
        return (f"transformers:\n    from transformers import AutoModelForCausalLM, AutoTokenizer\n"
                f"    model = AutoModelForCausalLM.from_pretrained('{path}')\n"
                f"    tokenizer = AutoTokenizer.from_pretrained('{path}')\n"
                f"vLLM:\n    vllm serve {path}\n")
    if fmt == "mlx" and merged:
        return f"mlx-lm:\n    mlx_lm.generate --model {path} --prompt 'Hello'\n    mlx_lm.server --model {path}\n"
    if fmt == "mlx":
        return f"mlx-lm:\n    mlx_lm.generate --model {base} --adapter-path {path} --prompt 'Hello'\n"
    return (f"llama.cpp:\n    llama-cli -m {path / gguf_file} -cnv\n"
            f"llama-cpp-python:\n    from llama_cpp import Llama\n    llm = Llama(model_path='{path / gguf_file}')\n"
            + (f"Ollama (the Modelfile holds the chat template, stop tokens and generation defaults):\n"
               f"    ollama create {name} -f {path / 'Modelfile'}\n    ollama run {name}\n" if modelfile else
               f"Ollama (no Modelfile: see details.modelfile.reason):\n    echo 'FROM {path / gguf_file}' > Modelfile "
               f"&& ollama create {name} -f Modelfile\n"))


def _size_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6, 3)


def _check_request(config: FineTuningConfig, manifest: dict[str, Any], run_id: str, stage: int, fmt: str,
                   merge: bool, quantization: Optional[str]) -> str:
    """Validate before anything is written; returns the quantization to use."""
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format '{fmt}'; use one of {', '.join(EXPORT_FORMATS)}")
    key = f"stage{stage}"
    if key not in manifest["stages"]:
        raise RunError(f"run {run_id} has no stage {stage}; its stages: {sorted(manifest['stages'])}")
    status = manifest["stages"][key]["status"]
    if status != "completed":
        raise RunError(f"stage {stage} of run {run_id} has not completed (status {status}); "
                       "only a finished stage can be exported")
    if fmt == "gguf":
        if not merge:
            raise ExportError("GGUF export needs the adapter merged into the model; use merge_adapters true, "
                              "or export 'adapters' for the adapter alone")
        arch = model_type(config.model_source())
        gguf_export.check(arch, quantization or config.export.gguf_quantization)
        return quantization or config.export.gguf_quantization
    if fmt == "mlx":
        chosen = quantization or config.export.mlx_quantization
        if chosen not in MLX_QUANTIZATIONS:
            raise ExportError(f"mlx quantization '{chosen}' is not supported; use one of "
                              f"{', '.join(MLX_QUANTIZATIONS)}")
        return chosen
    if quantization not in (None, "none"):
        raise ExportError(f"format {fmt} takes no quantization (got '{quantization}'); quantize with mlx or gguf")
    return "none"


def default_path(config: FineTuningConfig, run_id: str, stage: int, fmt: str, quantization: str) -> Path:
    suffix = f"-{quantization}" if quantization != "none" else ""
    return config.resolve(config.export.output_dir) / f"{run_id}-stage{stage}-{fmt}{suffix}"


def _build(fmt: str, merge: bool, quantization: str, source: str, adapter: Optional[Path], target: Path,
           generation: dict[str, Any], name: str, context: int = 2048, system: Optional[str] = None) -> dict[str, Any]:
    """Write the export's model files into the empty folder `target` (`adapter` None: `source`
    is the whole model a full fine-tune trained, and merge is true)."""
    if fmt == "adapters":
        adapter_into(adapter, "peft", source, target / "peft")
        adapter_into(adapter, "mlx", source, target / "mlx")
        return {"formats": ["peft", "mlx"]}
    if fmt in ("safetensors", "huggingface"):
        if not merge:
            adapter_into(adapter, "peft", source, target)
            return {"formats": ["peft"]}
        return merge_hf(source, adapter, target, generation)
    if fmt == "mlx":
        if not merge:
            adapter_into(adapter, "mlx", source, target)
            return {"formats": ["mlx adapter"]}
        return fuse_mlx(source, adapter, target, quantization)
    merged = target.parent / f"{target.name}.merged"
    merged.mkdir()
    try:
        facts = merge_hf(source, adapter, merged, generation)
        file = f"{name}-{quantization}.gguf"
        if quantization in gguf_export.QUANTIZATIONS:
            facts.update(gguf_export.convert(merged, target / file, quantization, name))
        else:  # f16 by this converter, then llama.cpp's own quantizer
            f16 = merged / f"{name}-f16.gguf"
            facts.update(gguf_export.convert(merged, f16, "f16", name))
            try:
                facts["quantize"] = gguf_quantize.quantize(f16, target / file, quantization)
            except gguf_quantize.QuantizeError as error:
                raise ExportError(str(error)) from None
            facts["quantization"] = quantization
        facts["gguf_file"] = file
        facts["size_mb"] = round((target / file).stat().st_size / 1e6, 3)
        facts["llama_cpp_check"] = _check_in_llama_cpp(target / file, merged)
        facts["modelfile"] = _modelfile(target, file, merged, generation, context, system)
    finally:
        shutil.rmtree(merged, ignore_errors=True)
    return facts


def _modelfile(target: Path, file: str, merged: Path, generation: dict[str, Any], context: int,
               system: Optional[str]) -> dict[str, Any]:
    """An Ollama Modelfile beside the GGUF, or why there is none (a template no family reproduces)."""
    import gguf
    from transformers import AutoTokenizer

    field = gguf.GGUFReader(str(target / file)).get_field("tokenizer.ggml.add_bos_token")
    bos_added = bool(field.contents()) if field is not None else False
    try:
        translation = ollama.translate(AutoTokenizer.from_pretrained(merged), bos_added)
        text = ollama.modelfile(file, translation, generation, context, system)
        ollama.parse(text)  # what Ollama's parser would refuse is not written
    except ollama.ModelfileError as error:
        return {"written": False, "reason": str(error)}
    write_atomic(target / "Modelfile", text)
    return {"written": True, "path": "Modelfile", "family": translation.family, "stop": translation.stop,
            "system": system if system is not None else translation.default_system,
            "checked_conversations": translation.checked}


def _check_in_llama_cpp(file: Path, merged: Path) -> dict[str, Any]:
    """The GGUF answers in llama.cpp as the merged model does in transformers (trainer/export/gguf_check.py);
    a file llama.cpp rejects fails the export, a crash of llama.cpp itself is reported."""
    try:
        return gguf_check.verify(file, merged)
    except gguf_check.LoaderError as error:
        raise ExportError(f"the GGUF export does not load in llama.cpp: {error}") from None


def export_run(config: FineTuningConfig, run_id: str, stage: int, fmt: str, output: Optional[Path] = None,
               merge: bool = True, quantization: Optional[str] = None, overwrite: bool = False,
               upload: bool = False, repo_id: Optional[str] = None, dry_run: bool = False,
               hub_api: Any = None) -> dict[str, Any]:
    """Export stage `stage` of run `run_id` as `fmt`; returns the spec's export_model result."""
    manager = RunManager(config)
    run_dir = manager.run_dir(run_id)
    with manager.lock(run_id):
        manifest = manager.manifest(run_id)
        run_config = manager.run_config(run_id)
        known = f"stage{stage}" in manifest["stages"]  # an unknown stage is refused by _check_request below
        trained, full = stage_output(run_dir, manifest, stage) if known else (None, False)
        if full and fmt == "adapters":
            raise ExportError(f"stage {stage} of run {run_id} trained every weight (training.fine_tune full): it has "
                              "no adapter; export safetensors, huggingface, mlx or gguf")
        merge = merge or full  # a whole model: nothing to merge, the formats hold it as it is
        chosen = _check_request(run_config, manifest, run_id, stage, fmt, merge, quantization)
        if upload:
            # uploading is the project's current choice, not the run's: read the live config
            if not config.huggingface.enabled:
                raise ExportError("uploading is off for this project (huggingface.enabled: false in the config); "
                                  "enable it, or export without upload")
            repo_id = hub.check_repo_id(repo_id or f"{config.huggingface.repo_prefix}/"
                                        f"{run_config.project.name}-stage{stage}-{fmt}")
            if not dry_run and hub_api is None:
                hub.require_token()  # before the export is built, not after
        target = export_target.check(config, output if output is not None else default_path(
            config, run_id, stage, fmt, chosen), overwrite)
        source = run_config.model_source()
        adapter: Optional[Path] = trained
        if full:  # the model the stage trained stands where the base and its adapter would
            source, adapter = str(trained), None
        name = f"{run_config.project.name}-stage{stage}"
        merged = fmt == "gguf" or (merge and fmt != "adapters")  # adapters are never merged
        target.parent.mkdir(parents=True, exist_ok=True)
        building = target.parent / f"{TEMP_PREFIX}{target.name}-{os.getpid()}"
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir()
        try:
            system = ollama.training_system_prompt(  # for the Modelfile: only a GGUF export reads the rows
                run_dir / f"stage{stage}" / "training-data" / "train.jsonl") if fmt == "gguf" else None
            facts = _build(fmt, merge, chosen, source, adapter, building, run_config.evaluation.generation.model_dump(),
                           name, run_config.training.max_seq_length, system)
            how = usage(fmt, target, merged, source, facts.get("gguf_file"),
                        (facts.get("modelfile") or {}).get("written", False), name)
            write_atomic(building / "README.md", model_card.render(manifest, run_dir, stage, fmt, merged, how))
            export_target.mark(building, config, {"run_id": run_id, "stage": stage, "export_format": fmt,
                                                  "created_at": now()})
            # the build took a while: what is at the target now must still be replaceable
            export_target.check(config, target, overwrite)
            if target.exists():  # overwrite: the old export goes only once the new one is complete
                retired = target.parent / f"{TEMP_PREFIX}{target.name}-old-{os.getpid()}"
                target.rename(retired)
                building.rename(target)
                shutil.rmtree(retired, ignore_errors=True)
            else:
                building.rename(target)
        finally:
            shutil.rmtree(building, ignore_errors=True)
            shutil.rmtree(target.parent / f"{building.name}.merged", ignore_errors=True)
        result: dict[str, Any] = {
            "success": True, "export_path": str(target), "export_format": fmt, "stage": stage, "run_id": run_id,
            "merged": merged, "quantization": chosen, "model_size_mb": _size_mb(target),
            "files": hub.files_of(target), "huggingface_url": None, "usage_instructions": how, "details": facts,
            "modelfile": str(target / "Modelfile") if (facts.get("modelfile") or {}).get("written") else None,
        }
        if upload:
            uploaded = hub.upload(target, repo_id, config.huggingface.private_repos, dry_run, hub_api)
            result["upload"] = uploaded
            result["huggingface_url"] = None if dry_run else uploaded["url"]
        record = {k: result[k] for k in ("export_format", "stage", "export_path", "merged", "quantization",
                                         "model_size_mb", "huggingface_url")}
        manager.update_manifest(run_id, lambda m: m.setdefault("exports", []).append({**record, "created_at": now()}))
        return result
