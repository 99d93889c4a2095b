"""A tiny Llama with random weights, in the Hugging Face layout vLLM loads.

    python3 -S make_model.py SITE OUT

The BPE tokenizer is trained on the package descriptions (``*.dist-info/METADATA``)
in SITE, the pinned packages of the recipe's pydeps step: local English text that
is part of the step's inputs, so the same inputs give the same vocabulary. The
weights come from a fixed seed. The same inputs give byte-identical files.
"""

from __future__ import annotations

import sys
from pathlib import Path

VOCAB = 4096
SPECIAL = ["<unk>", "<s>", "</s>"]


def corpus(site: Path) -> list[str]:
    """The text to train on: every package description in SITE, in a fixed order."""
    files = sorted(site.glob("*.dist-info/METADATA"))
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def train_tokenizer(texts: list[str]):
    """A byte-level BPE tokenizer (as Llama 3 and GPT-2 use) trained on TEXTS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def main(site: Path, out: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(corpus(site)),
                                  unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  model_max_length=512)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, torch_dtype="float32")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id).save_pretrained(out)
    tok.save_pretrained(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
