"""Write a deterministic tiny Llama with a locally trained byte-level BPE tokenizer, so vLLM can serve on a CPU
with no model download.

    python -m equinox_ray.engines.tiny_model --out models/tiny-llama

The weights are random (seeded); the text it generates is noise. head_dim is 64 because vLLM's CPU attention
supports only some head sizes (16 fails). The directory is written to a temporary sibling and renamed, so a crash
never leaves a half-written model that looks complete.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
from pathlib import Path

VOCAB_SIZE = 512
MAX_POSITIONS = 2048
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "qua", "fin", "dor", "eth", "ul", "bra", "sto"]


def corpus(seed: int, lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    words = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(600)]
    return [" ".join(rng.choices(words, k=rng.randint(4, 16))) + rng.choice([".", "?", "!"]) for _ in range(lines)]


def build_tokenizer(seed: int):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus(seed), vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=MAX_POSITIONS)


def build_model(seed: int, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(torch.bfloat16)


def write_tiny_model(out: Path, seed: int = 0) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        tokenizer = build_tokenizer(seed)
        build_model(seed, tokenizer).save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write the model into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_tiny_model(args.out, args.seed)
    print(f"tiny model written to {path}")


if __name__ == "__main__":
    main()
