"""The transformers Trainer adapter on a tiny GPT-2 and a tiny ViT built from configs (nothing
downloaded), and the python/hf_trainer_know.py recipe."""
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.utils.data import Dataset
from transformers import (AutoModelForCausalLM, AutoModelForImageClassification, AutoTokenizer,
                          GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, Trainer,
                          TrainingArguments, ViTConfig, ViTForImageClassification,
                          ViTImageProcessor, default_data_collator)

from know_kernels import KNOWN, predict
from know_kernels.integrations import require
from know_kernels.integrations.hf import forget_and_predict_hf

from support import RECIPES, ROOT
from support.recipes import run_recipe_smoke

pytestmark = pytest.mark.usefixtures("one_thread")
WORDS = ["[PAD]", "[UNK]", "[EOS]"] + "the a cat dog sees eats big small .".split()


class Examples(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def token_data(n=32, length=8):
    ids = torch.randint(3, len(WORDS), (n, length), generator=torch.Generator().manual_seed(0))
    return Examples([{"input_ids": row, "labels": row} for row in ids])


def image_data(n=32):
    g = torch.Generator().manual_seed(0)
    return Examples([{"pixel_values": torch.randn(3, 8, 8, generator=g), "labels": i % 3}
                     for i in range(n)])


def tokenizer():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   eos_token="[EOS]")


def pretrained_trainer(model, dataset, processing_class, run_dir):
    torch.manual_seed(0)
    trainer = Trainer(model=model, train_dataset=dataset, processing_class=processing_class,
                      data_collator=default_data_collator,
                      args=TrainingArguments(output_dir=str(run_dir), max_steps=2,
                                             per_device_train_batch_size=8, learning_rate=1e-2,
                                             report_to="none", save_strategy="no",
                                             logging_strategy="no", disable_tqdm=True,
                                             use_cpu=True, dataloader_pin_memory=False))
    trainer.train()
    return trainer


def check_outputs(trainer, result, auto, out, stages=3, steps=2):
    """Every directory loads with from_pretrained; the predictions are know_kernels.predict
    of the saved Θ's; the trainer's model ends as Θ^{S-1}."""
    assert result.snapshots == [out / f"theta{i}" for i in range(stages)]
    assert result.predictions == [out / f"know_step{k}" for k in range(1, steps + 1)]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # scratch removed
    thetas = [auto.from_pretrained(d).state_dict() for d in result.snapshots]
    assert not torch.equal(*(t[next(iter(t))] for t in thetas[:2]))  # stage 1 trained
    expected = predict(thetas, KNOWN.pretrained(stages), steps=steps)
    loaded = []
    for directory, want in zip(result.predictions, expected):
        assert (directory / "config.json").is_file()
        model = auto.from_pretrained(directory)
        got = model.state_dict()
        assert set(got) == set(want)
        assert all(torch.equal(got[k], want[k]) for k in want), directory
        loaded.append(model)
    final = trainer.model.state_dict()
    assert all(torch.equal(v.cpu(), thetas[-1][k]) for k, v in final.items())
    return loaded


def test_gpt2_trainer(tmp_path):
    tok = tokenizer()
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(WORDS), n_positions=8, n_embd=16,
                                       n_layer=1, n_head=2, bos_token_id=2, eos_token_id=2))
    trainer = pretrained_trainer(model, token_data(), tok, tmp_path / "run")
    out = tmp_path / "know"
    result = forget_and_predict_hf(trainer, out, r=0.5, stages=3, steps=2)
    assert result.sizes == [32, 16, 8]
    know1, _ = check_outputs(trainer, result, AutoModelForCausalLM, out)
    # Tied weights stay tied, and equal to the prediction of the embedding.
    assert know1.lm_head.weight.data_ptr() == know1.transformer.wte.weight.data_ptr()
    assert AutoTokenizer.from_pretrained(out / "know_step1").get_vocab() == tok.get_vocab()
    with pytest.raises(FileExistsError, match="theta0 exists; pass force=True"):
        forget_and_predict_hf(trainer, out, r=0.5, stages=3)


def test_vit_trainer(tmp_path):
    model = ViTForImageClassification(ViTConfig(
        image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=3))
    processor = ViTImageProcessor(size={"height": 8, "width": 8})
    trainer = pretrained_trainer(model, image_data(), processor, tmp_path / "run")
    out = tmp_path / "know"
    result = forget_and_predict_hf(trainer, out, r=0.5, stages=3, steps=2)
    check_outputs(trainer, result, AutoModelForImageClassification, out)
    assert (out / "know_step2" / "preprocessor_config.json").is_file()


def test_refuses_what_it_cannot_handle(tmp_path):
    with pytest.raises(TypeError, match="trainer must be a transformers.Trainer"):
        forget_and_predict_hf(object(), tmp_path, r=0.5)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(WORDS), n_positions=8, n_embd=16,
                                       n_layer=1, n_head=2))
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "run"),
                                                          report_to="none", use_cpu=True))
    with pytest.raises(ValueError, match="no train_dataset"):
        forget_and_predict_hf(trainer, tmp_path / "know", r=0.5)
    trainer.train_dataset = token_data()
    with pytest.raises(ValueError, match="shipped KNOWN exists for S in"):
        forget_and_predict_hf(trainer, tmp_path / "know", r=0.5, stages=7)
    assert not (tmp_path / "know").exists()  # refused before anything is written


def test_recipe_smoke(tmp_path, capsys):
    out = tmp_path / "know"
    run_recipe_smoke(RECIPES / "hf_trainer_know.py", out, capsys)
    model = AutoModelForCausalLM.from_pretrained(out / "know_step1")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_frameworks_are_imported_only_by_their_adapters():
    with pytest.raises(ImportError, match=r"needs the 'integrations' extra: pip install "
                                          r"'know-kernels\[integrations\]'"):
        require("know_kernels_no_such_framework")
    code = ("import sys, know_kernels.integrations, know_kernels.research.forget; "
            "print(sorted(m for m in ('transformers', 'lightning') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr[-2000:]
