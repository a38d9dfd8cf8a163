"""Forget, then predict, with a Hugging Face ``Trainer``: KNOW for a small GPT-2.

    python python/hf_trainer_know.py --out know-hf            # a few minutes on a CPU
    python python/hf_trainer_know.py --smoke --out /tmp/k     # the whole chain, tiny

1. A word-level tokenizer and a GPT-2 built from a ``GPT2Config`` (nothing is downloaded),
   on sentences of a small seeded grammar (number agreement between subject and verb),
   cut into blocks of 32 tokens.
2. Θ^0: the model pretrained with ``transformers.Trainer``.
3. ``know_kernels.integrations.hf.forget_and_predict_hf``: S-1 forgetting stages, each a
   new Trainer with the same arguments on a random fraction r of the previous stage's
   blocks, then KNOW's Θ̂^{-1} … Θ̂^{-steps}.  --out receives ``theta0/`` … and
   ``know_step1/`` …, each a ``save_pretrained`` directory with the tokenizer.
4. Each directory loaded back with ``AutoModelForCausalLM.from_pretrained`` and scored by
   its loss on held-out blocks.

For your own model: run your ``Trainer`` as usual, then call
``forget_and_predict_hf(trainer, out_dir, r=0.5, stages=5, steps=1)``.  An existing --out
is refused unless --force.
"""
from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from know_kernels.fileio import existing_output  # noqa: E402
from know_kernels.integrations import recipe_parser  # noqa: E402

BLOCK = 32
SPECIAL = ("[PAD]", "[UNK]", "[EOS]")
NOUNS = {"cat": "cats", "dog": "dogs", "bird": "birds", "fox": "foxes", "mouse": "mice",
         "child": "children"}
VERBS = {"sees": "see", "eats": "eat", "chases": "chase", "likes": "like", "hears": "hear"}
ADJECTIVES = ("big", "small", "red", "green", "old", "young", "quiet")
DETERMINERS = {False: ("the", "a", "every"), True: ("the", "some", "many")}  # by plural


def noun_phrase(rng: random.Random, plural: bool) -> list[str]:
    noun = rng.choice(list(NOUNS))
    adjective = [rng.choice(ADJECTIVES)] if rng.random() < 0.5 else []
    return [rng.choice(DETERMINERS[plural]), *adjective, NOUNS[noun] if plural else noun]


def sentence(rng: random.Random) -> list[str]:
    plural = rng.random() < 0.5
    verb = rng.choice(list(VERBS))
    return [*noun_phrase(rng, plural), VERBS[verb] if plural else verb,
            *noun_phrase(rng, rng.random() < 0.5), "."]


def vocabulary() -> list[str]:
    words = [w for pair in NOUNS.items() for w in pair] + [w for pair in VERBS.items()
                                                           for w in pair]
    words += [w for dets in DETERMINERS.values() for w in dets] + list(ADJECTIVES) + ["."]
    return list(SPECIAL) + sorted(set(words))


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = vocabulary()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   eos_token="[EOS]")


class Blocks(Dataset):
    """Blocks of BLOCK token ids from a stream of sentences, each its own label (the model
    shifts them)."""

    def __init__(self, tokenizer, blocks: int, seed: int):
        rng = random.Random(seed)
        ids: list[int] = []
        while len(ids) < blocks * BLOCK:
            ids += tokenizer(" ".join(sentence(rng)))["input_ids"] + [tokenizer.eos_token_id]
        self.ids = torch.tensor(ids[:blocks * BLOCK]).view(blocks, BLOCK)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@torch.no_grad()
def held_out_loss(directory: Path, data: Blocks) -> float:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    return model(input_ids=data.ids, labels=data.ids).loss.item()


def main(argv=None) -> int:
    args = recipe_parser(__doc__, "know-hf", "a 2-layer, 32-wide GPT-2 on 256 blocks: checks "
                         "the whole chain").parse_args(argv)
    out = Path(args.out)
    # Before the slow imports, so a refusal is immediate.
    error = existing_output(out, args.force)
    if error:
        print(f"{Path(__file__).name}: error: {error}", file=sys.stderr)
        return 2
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
    from know_kernels.integrations.hf import forget_and_predict_hf

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    width, layers, blocks, epochs = (32, 2, 256, 12) if args.smoke else (128, 4, 4096, 4)
    tokenizer = make_tokenizer()
    train, held_out = Blocks(tokenizer, blocks, args.seed), Blocks(tokenizer, 64, args.seed + 1)
    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tokenizer), n_positions=BLOCK, n_embd=width, n_layer=layers,
        n_head=width // 16, bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    with tempfile.TemporaryDirectory(prefix="know-hf-run-") as run_dir:
        # The forgetting stages reuse these arguments: num_train_epochs makes each stage's
        # cost shrink with its subset, as in the paper.
        trainer = Trainer(model=model, train_dataset=train, processing_class=tokenizer,
                          args=TrainingArguments(
                              output_dir=run_dir, num_train_epochs=epochs,
                              per_device_train_batch_size=16, learning_rate=3e-3,
                              seed=args.seed, save_strategy="no", report_to="none",
                              logging_strategy="no", disable_tqdm=True,
                              dataloader_pin_memory=torch.cuda.is_available()))
        trainer.train()
        print(f"Θ^0: GPT-2 ({sum(p.numel() for p in model.parameters()):,} parameters) "
              f"trained on {len(train)} blocks, {epochs} epochs")
        result = forget_and_predict_hf(trainer, out, r=args.r, stages=args.stages,
                                       steps=args.steps, seed=args.seed, force=args.force)
    sizes = result.data_sizes()  # a prediction's: the data it stands for
    print("\n| weights | training blocks | held-out loss |\n|---|---:|---:|")
    for name, directory in result.named.items():
        print(f"| {name}/ | {sizes[name]:.0f} | {held_out_loss(directory, held_out):.4f} |")
    print(f"\nwrote {out}/: load any directory with AutoModelForCausalLM.from_pretrained "
          f"(done above); {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
