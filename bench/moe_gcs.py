"""GradOT on experts: GCS per-expert channel pruning against magnitude and random pruning of the same size.

Usage (from the repository root):
    .venv/bin/python bench/moe_gcs.py [--model DIR] [--data-dir DIR] [--experts 8] [--top-k 2]
                                      [--channel-ratio 0.4] [--windows 32] [--out bench/results/moe_gcs]

No pretrained mixture-of-experts model fits this machine's offline store, so the test bed is the
reference Llama (../shared/models/ref-llama-12l, pretrained here) *upcycled* into a Mixtral: every
expert a copy of its layer's dense MLP, a seeded random router, top-k of E. Mixtral renormalises the
top-k weights to sum to 1, so the MoE computes exactly the pretrained model (checked below) while
each token reaches its own experts; per-expert scoring then sees each expert's own tokens.

Every emulator keeps every middle layer, attention untouched (``rank_ratio`` 1), and every expert
keeps ``--channel-ratio`` of its channels; only *which* channels differs:
``gcs`` at λ = 4 (the default) and λ = 0 (gradient change only), ``magnitude`` (channel norms: the
same channels in every copy of the expert) and ``random`` (seeds 0-2). For each: the adapter-gradient
cosine (full model vs emulator) and the emulator's LM loss on WikiText-2 validation and test windows,
which the calibration (War and Peace) does not see.

Writes ``results.json`` and ``results.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
POINTS = [("gcs", 4.0), ("gcs", 1.0), ("gcs", 0.25), ("gcs", 0.0), ("magnitude", None), ("random", 0), ("random", 1), ("random", 2)]


def upcycle(dense, experts: int, top_k: int, seed: int = 0):
    """A Mixtral whose every expert is a copy of the dense Llama layer's MLP (same function)."""
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    c = dense.config
    config = MixtralConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                           num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                           num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
                           max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                           rope_parameters=dict(c.rope_parameters), tie_word_embeddings=c.tie_word_embeddings,
                           num_local_experts=experts, num_experts_per_tok=top_k, sliding_window=None,
                           bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
    moe = AutoModelForCausalLM.from_config(config).eval()
    state = dense.state_dict()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if name in state:
                p.copy_(state[name])
        for i, layer in enumerate(moe.model.layers):
            mlp = dense.model.layers[i].mlp
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            layer.mlp.experts.gate_up_proj.copy_(gate_up.expand(experts, *gate_up.shape))
            layer.mlp.experts.down_proj.copy_(mlp.down_proj.weight.expand(experts, *mlp.down_proj.weight.shape))
            layer.mlp.gate.weight.copy_(torch.randn(layer.mlp.gate.weight.shape, generator=g))
    moe.tie_weights()
    return moe


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="../shared/models/ref-llama-12l")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--channel-ratio", type=float, default=0.4)
    p.add_argument("--windows", type=int, default=32, help="calibration windows x 128 tokens")
    p.add_argument("--held-windows", type=int, default=16)
    p.add_argument("--out", default="bench/results/moe_gcs")
    args = p.parse_args()
    os.chdir(ROOT)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    import torch

    from offsite.emulator import get_builder
    from offsite.emulator.inputs import BuildInputs
    from offsite.eval.gradients import adapter_gradient_cosine
    from offsite.families import get_family
    from offsite.model.loading import load_model
    from offsite.model.split import make_split

    from heldout import lm_loss, windows

    torch.set_num_threads(2)
    started = time.time()
    dense, tok = load_model(args.model)
    full = upcycle(dense, args.experts, args.top_k)
    family, split = get_family(full), make_split(full.config.num_hidden_layers, "2,2")
    calib, held = windows(args.data_dir, tok, args.windows, args.held_windows)
    with torch.no_grad():
        gap = max(float((full(input_ids=b).logits - dense(input_ids=b).logits).abs().max()) for b in held["valid"])
    print(f"upcycled MoE vs the dense model: max |logit difference| {gap:.2e}", flush=True)


    builder = get_builder("gradot")
    cache = tempfile.mkdtemp(prefix="moe-gcs-terms-")
    rows = []
    for scoring, value in POINTS:
        settings = {"channel_ratio": args.channel_ratio, "rank_ratio": 1.0, "scoring": scoring,
                    "num_sequences": args.windows}
        if scoring == "gcs":
            settings.update(lambda_mlp=value, cache_dir=cache)
        if scoring == "random":
            settings["seed"] = value
        config = builder.make_config(**settings)
        t0 = time.time()
        plan = builder.plan(full, family, split, config, BuildInputs(calibration=calib))
        emu = builder.apply(copy.deepcopy(full), family, split, plan)
        experts = [e for e in plan["mlp"] if "experts" in e]
        row = {"scoring": scoring, "lambda": value if scoring == "gcs" else None,
               "seed": value if scoring == "random" else None, "build_s": round(time.time() - t0, 1),
               "kept_channels": len(experts[0]["experts"][0]), "of": experts[0]["of"],
               "by_norm_experts": sum(len(e["by_norm"]) for e in experts),
               "params": sum(t.numel() for t in emu.parameters())}
        layer_map = [e["source"] for e in plan["layers"]]
        for name, batches in held.items():
            row[f"cos_{name}"] = adapter_gradient_cosine(full, emu, family, list(split.adapter), layer_map,
                                                         batches)["overall"]
            row[f"loss_{name}"] = lm_loss(emu, batches)
        rows.append(row)
        print(json.dumps(row), flush=True)
    random_rows = [r for r in rows if r["scoring"] == "random"]
    results = {"command": "python bench/moe_gcs.py " + " ".join(sys.argv[1:]), "model": args.model,
               "experts": args.experts, "top_k": args.top_k, "channel_ratio": args.channel_ratio,
               "calibration_windows": args.windows, "held_windows": args.held_windows,
               "upcycled_max_logit_gap": gap,
               "full": {f"loss_{n}": lm_loss(full, b) for n, b in held.items()}, "rows": rows,
               "random_mean": {k: statistics.mean(r[k] for r in random_rows)
                               for k in ("cos_valid", "cos_test", "loss_valid", "loss_test")},
               "seconds": round(time.time() - started, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(render(results))
    print(render(results))
    return 0


def render(r: dict) -> str:
    lines = ["# GradOT on experts: GCS vs magnitude vs random per-expert channel pruning\n",
             f"`{r['command']}` ({r['seconds']} s on 2 CPU cores). The reference Llama upcycled into a Mixtral "
             f"({r['experts']} copies of each layer's MLP, top-{r['top_k']}, seeded random router; max logit gap to "
             f"the dense model {r['upcycled_max_logit_gap']:.1e}). Every expert keeps {r['rows'][0]['kept_channels']} "
             f"of {r['rows'][0]['of']} channels, attention untouched; {r['calibration_windows']} calibration windows "
             f"(War and Peace), {r['held_windows']} held-apart WikiText-2 windows per split.\n",
             f"Full model LM loss: valid {r['full']['loss_valid']:.3f}, test {r['full']['loss_test']:.3f}.\n",
             "| scoring | λ / seed | adapter-gradient cosine valid | test | emulator loss valid | test | "
             "experts by norm | build s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        tag = row["lambda"] if row["scoring"] == "gcs" else (row["seed"] if row["seed"] is not None else "–")
        lines.append(f"| {row['scoring']} | {tag} | {row['cos_valid']:.4f} | {row['cos_test']:.4f} | "
                     f"{row['loss_valid']:.3f} | {row['loss_test']:.3f} | {row['by_norm_experts']} | {row['build_s']} |")
    m = r["random_mean"]
    lines.append(f"| random (mean of seeds) | – | {m['cos_valid']:.4f} | {m['cos_test']:.4f} | {m['loss_valid']:.3f} | "
                 f"{m['loss_test']:.3f} | – | – |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
