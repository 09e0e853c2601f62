"""Export pieces that need no engine: adapter format conversion, the GGUF support and
tokenizer checks, the Hub upload (with an offline fake for the Hub), the model card, and
the configure-time check of planned export formats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from trainer.export import gguf_check, gguf_export, hub, model_card
from trainer.models import adapters, gguf_support
from trainer.models.gguf_support import check_planned
from trainer.models.merge import ExportError

pytest.importorskip("safetensors")


def lora(layers=(0, 1), keys=("self_attn.q_proj", "self_attn.v_proj"), rank=4) -> adapters.LoraWeights:
    rng = np.random.default_rng(0)
    return adapters.LoraWeights(
        {f"model.layers.{i}.{k}": (rng.normal(size=(rank, 16)).astype(np.float32),
                                   rng.normal(size=(24, rank)).astype(np.float32)) for i in layers for k in keys},
        rank=rank, scale=2.5, dropout=0.1, source_format="test")


def test_adapters_convert_both_ways_without_loss(tmp_path: Path):
    original = lora()
    adapters.write_peft(original, tmp_path / "peft", "base")
    peft = adapters.read(tmp_path / "peft")
    assert adapters.detect(tmp_path / "peft") == "peft" and peft.scale == pytest.approx(2.5)
    adapters.convert(tmp_path / "peft", tmp_path / "mlx", "mlx", "base", total_layers=2)
    config = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert config["num_layers"] == 2 and config["lora_parameters"]["keys"] == ["self_attn.q_proj", "self_attn.v_proj"]
    back = adapters.read(tmp_path / "mlx")
    assert back.source_format == "mlx" and back.rank == 4 and back.scale == pytest.approx(2.5)
    for path, (a, b) in original.layers.items():
        np.testing.assert_array_equal(back.layers[path][0], a)  # mlx stores A transposed; read undoes it
        np.testing.assert_array_equal(back.layers[path][1], b)
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft_config["lora_alpha"] / peft_config["r"] == pytest.approx(2.5)
    assert peft_config["layers_to_transform"] == [0, 1]


def test_mlx_format_needs_the_last_blocks(tmp_path: Path):
    with pytest.raises(adapters.AdapterError, match="last N blocks"):
        adapters.write_mlx(lora(layers=(0,)), tmp_path / "mlx", total_layers=2)
    adapters.write_mlx(lora(layers=(1,)), tmp_path / "mlx", total_layers=2)  # the last block alone is fine
    assert json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())["num_layers"] == 1


def test_reading_nothing_names_the_folder(tmp_path: Path):
    with pytest.raises(adapters.AdapterError, match=str(tmp_path)):
        adapters.read(tmp_path)


def test_gguf_support_is_listed():
    gguf_export.check("olmo2", "q8_0")
    with pytest.raises(gguf_export.GGUFError, match="supported: llama, mistral, olmo2"):
        gguf_export.check("gpt_neox")
    with pytest.raises(gguf_export.GGUFError, match="available: f32, f16, q8_0") as caught:
        gguf_export.check("llama", "q4_k_z")
    # llama.cpp's types when its quantizer is installed, and said so when it is not
    offered = gguf_export.gguf_quantize.offered()
    assert caught.value.details["available"] == ["f32", "f16", "q8_0", *offered]
    if offered:
        gguf_export.check("llama", "q4_k_m")
    else:
        with pytest.raises(gguf_export.GGUFError, match="pip install llama-cpp-python"):
            gguf_export.check("llama", "q4_k_m")


@pytest.mark.parametrize(("pre", "model", "expected"), [
    ({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, {"type": "BPE"}, "gpt-2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": gguf_support.CL100K}},
                                            {"type": "ByteLevel", "use_regex": False}]},
     {"type": "BPE", "ignore_merges": True}, "llama-bpe"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": gguf_support.CL100K}},
                                            {"type": "ByteLevel", "use_regex": False}]}, {"type": "BPE"}, "dbrx"),
])
def test_tokenizer_pre_tokenizers_map_to_llama_cpp(tmp_path: Path, pre, model, expected):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"pre_tokenizer": pre, "model": model}))
    assert gguf_support.tokenizer_pre(tmp_path) == expected


def test_sentencepiece_models_are_recognised(tmp_path: Path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "byte_fallback": True}}))
    with pytest.raises(gguf_export.GGUFError, match="no tokenizer.model"):
        gguf_support.tokenizer_pre(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"spm")
    assert gguf_support.tokenizer_pre(tmp_path) == "default"


def test_unknown_tokenizers_are_refused(tmp_path: Path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"pre_tokenizer": {"type": "Whitespace"},
                                                         "model": {"type": "BPE"}}))
    with pytest.raises(gguf_export.GGUFError, match="Whitespace"):
        gguf_support.tokenizer_pre(tmp_path)


class FakeHubApiNoNetwork:
    """Stands in for huggingface_hub.HfApi, which this test cannot reach; records the calls."""

    def __init__(self, fail: bool = False):
        self.calls: list[tuple[str, dict]] = []
        self.fail = fail

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        return type("RepoUrl", (), {"url": f"https://huggingface.co/{kwargs['repo_id']}"})()

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        if self.fail:
            raise ConnectionError("hub unreachable")
        return type("CommitInfo", (), {"oid": "abc123"})()


def test_upload_creates_a_private_repo_and_uploads_the_folder(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    (tmp_path / "README.md").write_text("card")
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_model.safetensors").write_bytes(b"x")
    api = FakeHubApiNoNetwork()
    result = hub.upload(tmp_path, "me/model", private=True, api=api)
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1] == {"repo_id": "me/model", "repo_type": "model", "private": True, "exist_ok": True}
    assert api.calls[1][1]["folder_path"] == str(tmp_path)
    assert result["url"] == "https://huggingface.co/me/model" and result["commit"] == "abc123"
    assert result["files"] == ["README.md", "peft/adapter_model.safetensors"]
    assert "hf_secret_value" not in json.dumps(result)


def test_upload_dry_run_touches_nothing(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    (tmp_path / "model.gguf").write_bytes(b"x")
    api = FakeHubApiNoNetwork()
    result = hub.upload(tmp_path, "me/model", private=False, dry_run=True, api=api)
    assert result["dry_run"] and result["files"] == ["model.gguf"] and api.calls == []
    with pytest.raises(hub.UploadError, match="HF_TOKEN"):  # a real upload needs the token
        hub.upload(tmp_path, "me/model", private=False)


def test_upload_errors_name_the_repo_and_not_the_token(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    with pytest.raises(hub.UploadError, match="me/model failed: ConnectionError") as error:
        hub.upload(tmp_path, "me/model", private=True, api=FakeHubApiNoNetwork(fail=True))
    assert "hf_secret_value" not in str(error.value)
    with pytest.raises(hub.UploadError, match="user-or-org/model-name"):
        hub.upload(tmp_path, "no-slash", private=True, api=FakeHubApiNoNetwork())


def test_model_card_tells_where_the_model_came_from(tmp_path: Path):
    manifest = {
        "run_id": "r1", "project": {"name": "demo"}, "backend": {"resolved": "mlx"},
        "base_model": {"model_id": "allenai/OLMo-2-0425-1B", "source": "models/tiny"},
        "config": {"lora": {"rank": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj"], "num_layers": -1},
                   "training": {"max_seq_length": 512, "seed": 42, "gradient_accumulation_steps": 1}},
        "lineage": [{"stage": 1, "starts_from": "base model"}, {"stage": 2, "starts_from": "stage1/adapters"}],
        "stages": {f"stage{n}": {"iterations": 10 * n, "learning_rate": 1e-4, "batch_size": 4,
                                 "data": {"train": {"rows": 100 + n, "sha256": f"hash{n}"}}} for n in (1, 2)},
        "emissions": {"total_kg": 0.0012},
    }
    card = model_card.render(manifest, tmp_path, 2, "huggingface", True, "load it")
    assert card.startswith("---\nbase_model: \"allenai/OLMo-2-0425-1B\"\nlibrary_name: transformers")
    assert "| 1 | base model | 10 |" in card and "| 2 | stage1/adapters | 20 |" in card
    assert "`hash1`" in card and "`hash2`" in card and "rank 8, alpha 16" in card
    assert "Not evaluated yet" in card and "0.001200 kg CO2eq" in card and "load it" in card


def test_a_planned_gguf_export_is_checked_at_configure_time(config, tmp_path: Path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    config.base_model.local_path = model
    config.export.formats = ["adapters", "gguf"]
    with pytest.raises(ExportError, match="'gpt_neox' architecture"):
        check_planned(config)
    config.export.formats = ["adapters", "huggingface"]
    check_planned(config)  # without gguf, any architecture exports
    (model / "config.json").write_text(json.dumps({"model_type": "olmo2"}))
    config.export.formats = ["gguf"]
    check_planned(config)
    (model / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram"}}))
    with pytest.raises(ExportError, match="tokenizer cannot be exported"):  # known before training, too
        check_planned(config)


def test_a_llama_cpp_that_dies_is_reported_not_shared(tmp_path: Path):
    """The GGUF check's child process: a death by signal (a llama.cpp built for AMX crashes so)
    comes back as a finding; an error exit (llama.cpp rejecting the file) as LoaderError."""
    import sys

    file = tmp_path / "model.gguf"
    file.write_bytes(b"GGUF")
    dies = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"]
    assert gguf_check.decode(file, [1, 2], 4, command=dies)["crashed"] == "SIGILL"
    refuses = [sys.executable, "-c", "import sys; sys.exit('llama_model_load: error loading model')"]
    with pytest.raises(gguf_check.LoaderError, match="could not run model.gguf .exit 1.: llama_model_load"):
        gguf_check.decode(file, [1, 2], 4, command=refuses)
    answers = [sys.executable, "-c", "import json, sys; print(json.dumps({'tokens': json.load(sys.stdin)['prompt'], "
               "'stopped': sys.argv[3] == '0'}))"]
    assert gguf_check.decode(file, [5, 6], 4, repack=False, command=answers) == {"tokens": [5, 6], "stopped": True}
