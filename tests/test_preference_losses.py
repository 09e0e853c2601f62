"""The preference losses are the ones TRL computes: on the same tiny model, adapter and pairs,
the project's DPO loss equals TRL's DPOTrainer's (which a test builds and asks), its ORPO loss
equals one assembled from TRL's ORPOTrainer's own functions, and the mlx backend computes what
the transformers backend computes."""

from __future__ import annotations

import importlib
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import REPO

pytest.importorskip("peft")
trl = pytest.importorskip("trl")


@pytest.fixture(scope="module")
def trainer_package():
    """The template's trainer package, pinned to its folder (see tests/test_export.py)."""

    def forget() -> None:
        for module in [m for m in sys.modules if m == "trainer" or m.startswith("trainer.")]:
            del sys.modules[module]

    forget()
    package = types.ModuleType("trainer")
    package.__path__ = [str(REPO / "template" / "trainer")]
    sys.modules["trainer"] = package
    yield lambda name: importlib.import_module(f"trainer.{name}")
    forget()


@pytest.fixture(scope="module")
def setup(trainer_package, tmp_path_factory):
    """A tiny llama with a fresh LoRA adapter in the transformers backend, and four pairs."""
    tiny_model = trainer_package("models.tiny_model")
    config = trainer_package("config")
    backends = trainer_package("engines.backends")
    data = trainer_package("data.training_data")
    folder = tmp_path_factory.mktemp("pref") / "tiny"
    tiny_model.build("llama", folder, ["some text for a tokenizer"] * 4, seed=1, verify=False)
    backend = backends.make_backend("transformers", 0)
    backend.load(str(folder), "none", folder.parent / "q")
    backend.add_adapters(config.LoraSection(dropout=0.0), False, None)
    backend.setup_optimizer(config.TrainingSection())
    backend.eval_mode()
    rng = np.random.default_rng(0)
    vocabulary = backend.vocabulary()
    pairs = [tuple(rng.integers(5, vocabulary, size=int(rng.integers(low, high))).tolist()
                   for low, high in ((3, 9), (2, 7), (2, 7))) for _ in range(4)]
    rows = data.TokenizedSet(tokens=[p + c for p, c, _ in pairs], starts=[len(p) for p, _, _ in pairs],
                             quality=[None] * 4, rejected=[p + r for p, _, r in pairs],
                             rejected_starts=[len(p) for p, _, _ in pairs])
    batch = data.collate_pairs(rows, range(4), backend.pad_id, 1)
    return SimpleNamespace(backend=backend, batch=batch, pairs=pairs, rows=rows, folder=folder, data=data,
                           config=config, backends=backends)


def randomize(backend, adapter: str = "default") -> None:
    """Give the policy adapter's B values (it starts at zero), leaving any other adapter alone."""
    import torch

    torch.manual_seed(0)
    for name, p in backend.model.named_parameters():
        if f"lora_B.{adapter}." in name:
            p.data.normal_(0, 0.05)


@pytest.mark.slow
def test_dpo_loss_is_trls(setup, tmp_path):
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    backend, batch = setup.backend, setup.batch
    reference = backend.row_logps(batch)  # the adapter as the stage starts (B = 0): the base model
    # TRL keeps the adapter as it was at its start as "ref" (the dataset is only there to be prepared)
    trainer = DPOTrainer(model=backend.peft, args=DPOConfig(output_dir=str(tmp_path), beta=0.3, use_cpu=True,
                                                            report_to=[]),
                         train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]),
                         processing_class=backend.tokenizer)
    randomize(backend)
    inputs = DataCollatorForPreference(pad_token_id=backend.pad_id)(
        [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in setup.pairs])
    with torch.no_grad():
        theirs = float(trainer._compute_loss(backend.peft, inputs, return_outputs=False))
    backend.method, backend.beta = "dpo", 0.3
    batch.reference = np.array(reference, dtype=np.float32)
    with torch.no_grad():
        pair_loss, nll, stats = backend._preference(batch)
    ours = float(pair_loss) / batch.pairs
    assert abs(ours - theirs) < 1e-5 and abs(ours - np.log(2)) > 1e-3, (ours, theirs)
    assert float(nll) == 0.0 and stats["accuracy"] in {0.0, 1.0, 2.0, 3.0, 4.0}
    backend.peft.delete_adapter("ref")


@pytest.mark.slow
def test_orpo_loss_is_trls(setup):
    import torch
    import torch.nn.functional as F
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    backend, batch = setup.backend, setup.batch
    randomize(backend)
    backend.method, backend.beta = "orpo", 0.25
    with torch.no_grad():
        pair_loss, nll, _ = backend._preference(batch)
        ours = float(pair_loss) / batch.pairs + float(nll) / float(sum(len(c) for _, c, _ in setup.pairs))
        # TRL's ORPO on the same rows: mean log-probabilities of the answers, its odds-ratio loss,
        # and the token-mean NLL of the chosen answers
        width = max(len(p) + max(len(c), len(r)) for p, c, r in setup.pairs)
        ids = torch.full((8, width), backend.pad_id)
        labels = torch.full((8, width), -100)
        for j, (p, c, r) in enumerate(setup.pairs):
            for k, answer in ((j, c), (j + 4, r)):
                ids[k, :len(p) + len(answer)] = torch.tensor(p + answer)
                labels[k, len(p):len(p) + len(answer)] = torch.tensor(answer)
        logits = backend.peft(input_ids=ids).logits
        logps = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
        orpo = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
        losses, *_ = ORPOTrainer.odds_ratio_loss(orpo, logps[:4], logps[4:])
        nll_chosen = F.cross_entropy(logits[:4, :-1].reshape(-1, logits.shape[-1]), labels[:4, 1:].reshape(-1))
        theirs = float(nll_chosen - losses.mean())
    assert abs(ours - theirs) < 1e-5, (ours, theirs)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_mlx_computes_what_transformers_computes(setup, tmp_path, method):
    pytest.importorskip("mlx_lm")
    backend, batch = setup.backend, setup.batch
    randomize(backend)
    backend.method = method
    shift = np.random.default_rng(1).normal(0, 1, size=2 * batch.pairs)  # any reference, margins far from 0
    batch.reference = (np.array(backend.row_logps(batch)) + shift).astype(np.float32)
    backend.save_adapter(tmp_path / "peft")
    adapters = importlib.import_module("trainer.models.adapters")
    adapters.convert(tmp_path / "peft", tmp_path / "mlx", "mlx", str(setup.folder), 2)
    other = setup.backends.make_backend("mlx", 0)
    other.load(str(setup.folder), "none", tmp_path / "q")
    other.add_adapters(setup.config.LoraSection(dropout=0.0), False, tmp_path / "mlx")
    other.eval_mode()
    other.method, other.beta = method, backend.beta
    theirs, ours = other.preference_sums([batch]), backend.preference_sums([batch])
    assert set(ours) == set(theirs)
    for key in ours:
        assert abs(ours[key] - theirs[key]) <= 1e-4 * max(1.0, abs(ours[key])), (key, ours[key], theirs[key])
    assert ours["pairs"] == 4 and ours["pair_loss"] > 0
