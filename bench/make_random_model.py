"""Write a random-weight model of a real shape, a tokenizer, public text and a small mc task.

Usage: python bench/make_random_model.py SHAPE OUT [--dtype bfloat16] [--device cuda]

Nothing can be downloaded here, so the cost of offsite on a real model is measured on random
weights of the real shape: the same tensors, the same FLOPs, the same memory. The tokenizer is a
byte-level BPE trained on the generated text (a few thousand ids, inside the model's vocabulary);
``OUT/public.txt`` is calibration text and ``OUT/task/{train,validation}.jsonl`` an ad-hoc
multiple-choice task, so every workflow can run offline. Shapes are the published configs.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SHAPES = {
    # TinyLlama/TinyLlama-1.1B (config.json of the released checkpoint)
    "tinyllama-1.1b": dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                           max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0),
    # meta-llama/Llama-2-7b-hf
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       max_position_embeddings=4096, rms_norm_eps=1e-5),
    # facebook/opt-125m
    "opt-125m": dict(model_type="opt", hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12,
                     vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=768),
    # a 1.5 GB bf16 Llama (issue 13's memory target) and the same width at half the depth
    "llama-1.5gb-24l": dict(model_type="llama", hidden_size=1536, intermediate_size=4096, num_hidden_layers=24,
                            num_attention_heads=12, num_key_value_heads=12, vocab_size=32000),
    "llama-1.5gb-12l": dict(model_type="llama", hidden_size=1536, intermediate_size=4096, num_hidden_layers=12,
                            num_attention_heads=12, num_key_value_heads=12, vocab_size=32000),
    # allenai/OLMoE-1B-7B-0924's layer (64 experts of 1024 channels, top-8) at 3 of its 16 layers: one
    # middle layer with --adapter-layers 1,1, the MoE cost figure of issue 28
    "olmoe-1b-7b-3l": dict(model_type="olmoe", hidden_size=2048, intermediate_size=1024, num_hidden_layers=3,
                           num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                           vocab_size=50304, max_position_embeddings=4096, rms_norm_eps=1e-5),
    # the depth pair of bench/scale.py: one width, two depths (how cost grows with depth alone)
    "llama-w512-12l": dict(model_type="llama", hidden_size=512, intermediate_size=1408, num_hidden_layers=12,
                           num_attention_heads=8, num_key_value_heads=8, vocab_size=32000),
    "llama-w512-24l": dict(model_type="llama", hidden_size=512, intermediate_size=1408, num_hidden_layers=24,
                           num_attention_heads=8, num_key_value_heads=8, vocab_size=32000),
}
WORDS = ("the river town baker sells bread every morning while the old teacher walks her dog past the "
         "market and a red boat waits near the bridge for the fishermen who sing").split()


def _text(rng: random.Random, sentences: int) -> str:
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))) + "." for _ in range(sentences))


def _task(folder: Path, rng: random.Random) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 256), ("validation", 128)):
        rows = []
        for i in range(n):
            choices = rng.sample(WORDS, 4)
            rows.append({"id": f"{split}{i}", "context": "", "question": f"which word comes {i % 7}?",
                         "choices": choices, "label": rng.randrange(4)})
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def byte_bpe_tokenizer(text: str, vocab_size: int = 2000):
    """A byte-level BPE tokenizer trained on ``text`` (a stand-in: cost does not depend on its merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab_size,
                                                       special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def main(argv=None) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("out")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cpu", help="where to initialise (cuda is much faster for 1B+)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    text = _text(rng, 4000)
    (out / "public.txt").write_text(text + "\n")
    _task(out / "task", rng)

    tokenizer = byte_bpe_tokenizer(text)

    shape = dict(SHAPES[args.shape])
    config = AutoConfig.for_model(shape.pop("model_type"), **shape)
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"shape": args.shape, "dtype": args.dtype, "parameters": params, "out": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
