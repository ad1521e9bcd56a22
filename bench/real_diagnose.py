"""Why an adapter tuned on an emulator does not transfer on a real LM: cheap diagnostics, no fine-tuning.

Usage (from the repository root; issue 24 item 1):
    .venv/bin/python bench/real_diagnose.py [--model DIR] [--data-dir ../shared/data]
                                            [--only NAME,...] [--out bench/results/real_diagnose]

For every emulator variant (below), built in memory from the base model exactly as ``offsite emulate``
builds it (``builder.build``; calibration = the default public corpus, War and Peace), it measures
against the full model, on the *same* batches:

* ``text``: WikiText-2 **validation** windows (16 x 128 tokens, not the calibration text), the mean
  next-token loss over every position;
* ``mc``: 32 SciQ **training** questions drawn from the first 2000 (the fine-tuning set of issue 24),
  encoded exactly as ``offsite finetune --format mc`` encodes them (context + "Question: ..\\nAnswer:"
  then " answer" + EOS, loss on the answer tokens and EOS only), 4 batches of 8; the loss is also split
  into the answer tokens and the EOS token;

and for each of the two: (1) the emulator's loss vs the full model's, (2) the gradient of that loss
w.r.t. the adapter layers' parameters, through the emulator and through the full model: cosine overall
and per adapter layer, the norm ratio, and the *sign agreement* sum(g_full * sign(g_emu)) / sum|g_full|
(how much of the full model's first-order loss decrease a sign-like first Adam step taken on the
emulator gets: 1 = all of it, 0 = none, < 0 = it raises the full model's loss); (3) the emulator's
parameter count (tied weights once). Noise floor: the same measures between the full model's own
gradients on two disjoint halves of the batches (``full_a_vs_b``).

Results are written after every variant (``results.json``; a rerun skips variants already there, so
the run is resumable), with ``results.md`` and ``cosine.png`` (gradient cosine vs emulator size).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from realbench import ROOT, save, smol_path  # noqa: E402 (bench/ is on sys.path when run as a script)

# name -> (method, settings, adapter_layers)
VARIANTS = {}
for k in (6, 10, 12, 16, 18, 20, 24):
    VARIANTS[f"uniform-{k}"] = ("uniform", {"emulator_layers": k}, "2,2")
for k in (6, 10):
    # measured before kd_scale existed, i.e. with OT's global scale
    VARIANTS[f"distill-{k}"] = ("distill", {"emulator_layers": k, "steps": 100, "kd_scale": "global"}, "2,2")
    VARIANTS[f"distill-{k}-token"] = ("distill", {"emulator_layers": k, "steps": 100, "kd_scale": "token"}, "2,2")
VARIANTS["scaleot-a0.75"] = ("scaleot", {"alpha": 0.75, "beta": 0.2}, "2,2")  # the default
VARIANTS["scaleot-a0.5"] = ("scaleot", {"alpha": 0.5, "beta": 0.2}, "2,2")
VARIANTS["scaleot-a0.25"] = ("scaleot", {"alpha": 0.25, "beta": 0.2}, "2,2")
for b in (0.25, 0.4, 0.6):
    VARIANTS[f"gradot-{b}"] = ("gradot", {"param_budget": b}, "2,2")  # λ 4, the default
for lam in (0.0, 1e6):
    VARIANTS[f"gradot-0.4-lam{lam:g}"] = ("gradot", {"param_budget": 0.4, "lambda_attn": lam, "lambda_mlp": lam},
                                          "2,2")
VARIANTS["gradot-0.6-lam0"] = ("gradot", {"param_budget": 0.6, "lambda_attn": 0.0, "lambda_mlp": 0.0}, "2,2")
# item 4: GCS at several lambda against magnitude and random selection at the same size
for lam in (1.0, 16.0, 1e6):
    VARIANTS[f"gradot-0.6-lam{lam:g}"] = ("gradot", {"param_budget": 0.6, "lambda_attn": lam, "lambda_mlp": lam},
                                          "2,2")
VARIANTS["gradot-0.25-lam0"] = ("gradot", {"param_budget": 0.25, "lambda_attn": 0.0, "lambda_mlp": 0.0}, "2,2")
for scoring in ("magnitude", "random"):
    VARIANTS[f"gradot-0.6-{scoring}"] = ("gradot", {"param_budget": 0.6, "scoring": scoring}, "2,2")
VARIANTS["crash"] = ("crash", {}, "2,2")
VARIANTS["crash-share"] = ("crash", {"share": True}, "2,2")
VARIANTS["uniform-6-ad3.3"] = ("uniform", {"emulator_layers": 6}, "3,3")
VARIANTS["uniform-6-ad4.4"] = ("uniform", {"emulator_layers": 6}, "4,4")
VARIANTS["uniform-10-ad4.4"] = ("uniform", {"emulator_layers": 10}, "4,4")
# the adapter on top only (the bottom adapter's gradient does not transfer at any uniform size)
VARIANTS["uniform-10-ad0.4"] = ("uniform", {"emulator_layers": 10}, "0,4")
VARIANTS["uniform-6-ad0.4"] = ("uniform", {"emulator_layers": 6}, "0,4")
VARIANTS["uniform-10-ad0.2"] = ("uniform", {"emulator_layers": 10}, "0,2")
VARIANTS["distill-10-300"] = ("distill", {"emulator_layers": 10, "steps": 300, "kd_scale": "global"}, "2,2")
# Uniform drop with the middle layers chosen by hand (plan built here, applied by the uniform method):
# the drop scan found layers 2, 11 and 24 carry most of the loss; keep them and spread the rest.
KEEP = {"keep10": [2, 5, 8, 11, 14, 17, 20, 22, 24, 27], "keep6": [2, 7, 11, 16, 20, 24],
        # sensitivity of the bottom adapter's gradient: the whole middle (must give cosine ~1), and the
        # whole middle less one harmless layer (14: +0.10 nats alone) or the critical one (11: +2.1)
        "keep26": list(range(2, 28)), "drop14": [i for i in range(2, 28) if i != 14],
        "drop11": [i for i in range(2, 28) if i != 11],
        # the sink chain (massive activation at token 0: layer 2 writes ~650, layers 9-10 remove it,
        # layer 11 writes ~22700 that lasts to layer 28) kept whole, the rest spread or cut as a block
        "sink10": [2, 9, 10, 11, 13, 16, 19, 22, 25, 27], "sink6": [2, 9, 10, 11, 19, 27],
        "sink14": [2, 5, 8, 9, 10, 11, 13, 15, 17, 19, 21, 23, 25, 27], "block10": list(range(2, 12))}
for _name, _kept in KEEP.items():
    for _adapter in ("2,2", "0,4"):
        VARIANTS[f"uniform-{_name}-ad{_adapter.replace(',', '.')}"] = ("uniform-keep", {"kept": _kept}, _adapter)

CACHED = {"scaleot", "gradot"}  # methods whose expensive part is shared between variants through cache_dir


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="base model folder (default: offsite models path smollm2-135m)")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--only", default=None, help="comma-separated variant names (default: all, in order)")
    p.add_argument("--mc-examples", type=int, default=32)
    p.add_argument("--text-windows", type=int, default=16)
    p.add_argument("--out", default="bench/results/real_diagnose")
    p.add_argument("--plot-only", action="store_true")
    p.add_argument("--sink-detach", action="store_true",
                   help="stop the gradient through token 0 (the attention sink) where it leaves the bottom adapter, "
                        "in the full model and the emulator alike; rows are named VARIANT+sd")
    p.add_argument("--drop-scan", action="store_true",
                   help="also: the full model's text and mc loss with each single middle layer (2,2 split) removed")
    args = p.parse_args()
    os.chdir(ROOT)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    if args.plot_only:
        write(results, out)
        return 0

    import torch

    from offsite.calibration import calibration_batches
    from offsite.data.examples import collate, encode_pairs
    from offsite.data.examples import prompt_pairs
    from offsite.emulator import get_builder
    from offsite.emulator.inputs import BuildInputs
    from offsite.families import count_parameters, get_family
    from offsite.model.loading import load_model
    from offsite.model.split import make_split

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model_dir = args.model or smol_path()
    full, tok = load_model(model_dir)
    full.eval()
    family = get_family(full)
    data = Path(args.data_dir)

    text = calibration_batches(data / "lm/wikitext-2-raw/wiki.valid.raw.gz", tok, seq_len=128,
                               num_sequences=args.text_windows, batch_size=4, seed=2)
    pairs = prompt_pairs(data / "mc/sciq/train.jsonl.gz", "mc")[:2000]
    pick = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(24))[:args.mc_examples].tolist()
    examples = sorted(encode_pairs([pairs[i] for i in pick], tok, 512), key=lambda e: len(e["input_ids"]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    mc = [collate(examples[i:i + 8], pad) for i in range(0, len(examples), 8)]
    text = [{"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b.clone()} for b in text]
    sets = {"text": text, "mc": mc}
    eos = tok.eos_token_id
    results.update(model="SmolLM2-135M-Instruct (offsite models path smollm2-135m, fp32)",
                   command="python bench/real_diagnose.py " + " ".join(sys.argv[1:]),
                   data={"text": f"WikiText-2 validation, {args.text_windows} windows x 128 tokens (seed 2)",
                         "mc": f"SciQ train, {len(examples)} of the first 2000 questions (seed 24), finetune mc "
                               f"encoding, {len(mc)} batches of 8"},
                   full_params=count_parameters(full))

    def measure(model, positions, batches):
        """One forward + backward per batch: the token-mean losses (all scored tokens, answer tokens only,
        the EOS token only) and the flattened fp32 gradient per layer at ``positions`` of the mean loss."""
        from offsite.families import get_layers

        layers = get_layers(model, family)
        for q in model.parameters():
            q.requires_grad_(False)
            q.grad = None
        params = [list(layers[i].parameters()) for i in positions]
        hook = None
        bottom = [i for i in positions if i < len(layers) // 2]
        if args.sink_detach and bottom:
            hook = layers[max(bottom)].register_forward_hook(_detach_sink)
        for group in params:
            for q in group:
                q.requires_grad_(True)
        n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        tot = {"all": [0.0, 0], "answer": [0.0, 0], "eos": [0.0, 0]}
        for b in batches:
            lo, tg = token_losses(model, b)
            (lo.sum() / n).backward()
            lo = lo.detach()
            for key, m in (("all", torch.ones_like(tg, dtype=torch.bool)), ("answer", tg != eos), ("eos", tg == eos)):
                tot[key][0] += float(lo[m].sum())
                tot[key][1] += int(m.sum())
        if hook is not None:
            hook.remove()
        g = [torch.cat([q.grad.detach().float().flatten() for q in group]) for group in params]
        for group in params:
            for q in group:
                q.grad = None
                q.requires_grad_(False)
        return {k: (v / c if c else None) for k, (v, c) in tot.items()}, g, n

    def measure_loss(model, batches):
        n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        return sum(float(token_losses(model, b)[0].sum()) for b in batches) / n

    def compare(g_full, g_emu, names):
        cat_f, cat_e = torch.cat(g_full), torch.cat(g_emu)

        def one(a, b):
            return {"cos": float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0)),
                    "norm_ratio": float(b.norm() / a.norm()),
                    "sign_agree": float((a.double() * torch.sign(b.double())).sum() / a.double().abs().sum())}

        return {"overall": one(cat_f, cat_e), "per_layer": {str(i): one(a, b) for i, a, b in zip(names, g_full, g_emu)}}

    full_cache = {}
    suffix = "+sd" if args.sink_detach else ""
    # the full model's gradients, ScaleOT's scores + harmonizers and GradOT's terms, reused between
    # variants and reruns (outside the repository)
    cache_root = Path(tempfile.gettempdir()) / "offsite-real-diagnose-cache"

    def full_side(adapter_spec):
        if adapter_spec not in full_cache:
            split = make_split(full.config.num_hidden_layers, adapter_spec)
            adapter = list(split.adapter)
            t0 = time.time()
            stored = cache_root / f"full-grads-ad{adapter_spec}{suffix}.pt"  # reruns skip the full model's passes
            if stored.exists() and f"full-ad{adapter_spec}{suffix}" in results.get("full", {}):
                full_cache[adapter_spec] = (split, adapter, torch.load(stored))
                return full_cache[adapter_spec]
            g, loss, floor = {}, {}, {}
            for name, b in sets.items():  # the two halves, combined into the whole (token-weighted)
                la, ga, na = measure(full, adapter, b[0::2])
                lb, gb, nb = measure(full, adapter, b[1::2])
                g[name] = [(na * x + nb * y) / (na + nb) for x, y in zip(ga, gb)]
                floor[name] = compare(ga, gb, adapter)
                loss[name] = {k: None if la[k] is None else (la[k] * na + lb[k] * nb) / (na + nb) for k in la}
                loss[name]["all"] = (la["all"] * na + lb["all"] * nb) / (na + nb)
            full_cache[adapter_spec] = (split, adapter, g)
            stored.parent.mkdir(parents=True, exist_ok=True)
            torch.save(g, stored)
            key = f"full-ad{adapter_spec}{suffix}"
            if key not in results.get("full", {}):
                results.setdefault("full", {})[key] = {
                    "loss": loss,
                    "full_a_vs_b": floor, "seconds": round(time.time() - t0, 1)}
                save(results, out)
            print(f"full model, adapter {adapter_spec}: {json.dumps(results['full'][key])}", flush=True)
        return full_cache[adapter_spec]

    if args.drop_scan:
        from offsite.families import get_layers, set_layers

        scan = results.setdefault("drop_scan", {})
        layers = list(get_layers(full, family))
        for i in range(2, len(layers) - 2):
            if str(i) in scan:
                continue
            keep = [j for j in range(len(layers)) if j != i]
            dropped = copy.deepcopy(full)
            set_layers(dropped, family, [get_layers(dropped, family)[j] for j in keep], keep)
            with torch.no_grad():
                scan[str(i)] = {s: measure_loss(dropped, b) for s, b in sets.items()}
            del dropped
            save(results, out)
            print(f"drop layer {i}: {scan[str(i)]}", flush=True)

    names = args.only.split(",") if args.only else ([] if args.drop_scan else list(VARIANTS))
    caches = {m: str(cache_root / m) for m in CACHED}
    for name in names:
        if name + suffix in results["rows"]:
            print(f"{name}: done before, skipped", flush=True)
            continue
        method, settings, adapter_spec = VARIANTS[name]
        split, adapter, g_full = full_side(adapter_spec)
        t0 = time.time()
        if method == "uniform-keep":  # a hand-chosen plan, applied as uniform drop applies its own
            from offsite.emulator.base import layer_entries

            builder = get_builder("uniform")
            plan = {"layers": layer_entries(split, settings["kept"]), "emulator_layers": len(settings["kept"])}
            emu = builder.apply(copy.deepcopy(full), family, split, plan)
        else:
            builder = get_builder(method)
            extra = {"cache_dir": caches[method]} if method in CACHED else {}
            config = builder.make_config(**settings, **extra)
            plan, emu = builder.build(copy.deepcopy(full), family, split, config, BuildInputs(calibration=None,
                                                                                              tokenizer=tok))
        emu.eval()
        build_s = time.time() - t0
        layer_map = [e["source"] for e in plan["layers"]]
        positions = [layer_map.index(i) for i in adapter]
        row = {"method": method, "settings": settings, "adapter_layers": adapter_spec,
               "params": count_parameters(emu), "decoder_layers": len(layer_map),
               "middle_entries": sum(e["role"] == "emulator" for e in plan["layers"]),
               "build_s": round(build_s, 1)}
        row["params_fraction"] = row["params"] / results["full_params"]
        row["loss"] = {}
        for s, b in sets.items():
            row["loss"][s], g_emu, _ = measure(emu, positions, b)
            row[f"grad_{s}"] = compare(g_full[s], g_emu, adapter)
        row["seconds"] = round(time.time() - t0, 1)
        row["sink_detach"] = bool(args.sink_detach)
        results["rows"][name + suffix] = row
        save(results, out)
        print(f"{name + suffix}: {json.dumps(row)}", flush=True)
        del emu
    write(results, out)
    return 0


def _detach_sink(module, inputs, output):
    """Forward hook: the layer's output with token 0's hidden state cut from the gradient."""
    import torch

    hidden = output[0] if isinstance(output, tuple) else output
    hidden = torch.cat([hidden[:, :1].detach(), hidden[:, 1:]], dim=1)
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def token_losses(model, batch):
    """Per-scored-token cross-entropy (fp32) and its targets; the head only at scored positions."""
    import torch.nn.functional as F

    labels = batch["labels"]
    rows, cols = (labels[:, 1:] != -100).nonzero(as_tuple=True)
    targets = labels[:, 1:][rows, cols]
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         use_cache=False).last_hidden_state[rows, cols]
    parts = [F.cross_entropy(model.lm_head(hidden[i:i + 512]).float(), targets[i:i + 512], reduction="none")
             for i in range(0, hidden.shape[0], 512)]
    import torch

    return torch.cat(parts), targets




def write(results: dict, out: Path) -> None:
    save(results, out)
    (out / "results.md").write_text(render(results))
    plot(results, out / "cosine.png")


def render(r: dict) -> str:
    lines = ["# Why the adapter does not transfer on SmolLM2: emulator vs full model at the adapter (issue 24)", "",
             f"Produced by `{r.get('command', '')}` on 2 shared CPU cores; no fine-tuning. Model: {r.get('model')}, "
             f"{r.get('full_params', 0) / 1e6:.1f}M parameters. Data: text = {r.get('data', {}).get('text')}; "
             f"mc = {r.get('data', {}).get('mc')}. Emulators built as `offsite emulate` builds them (calibration: "
             "the default public corpus). Gradients w.r.t. the adapter layers' parameters, through the emulator "
             "vs through the full model, same batches. `sign` = sum(g_full·sign(g_emu))/sum|g_full| (share of "
             "the full model's first-order loss decrease that a sign-like first Adam step taken on the emulator "
             "gets). `floor` rows: the full model's gradient on batches 1, 3 vs batches 2, 4 (mc batches are sorted by length).", ""]
    for key, f in r.get("full", {}).items():
        lo = f["loss"]
        lines.append(f"- {key}: text loss {lo['text']['all']:.3f}; mc loss {lo['mc']['all']:.3f} (answer tokens "
                     f"{lo['mc']['answer']:.3f}, EOS {lo['mc']['eos']:.3f}); floor (half vs half) cos text "
                     f"{f['full_a_vs_b']['text']['overall']['cos']:.3f}, mc {f['full_a_vs_b']['mc']['overall']['cos']:.3f}; "
                     f"sign mc {f['full_a_vs_b']['mc']['overall']['sign_agree']:.3f}")
    lines += ["", "| variant | adapter | params (M) | of full | text loss | mc loss | mc answer loss | mc EOS loss | "
              "cos text | cos mc | sign mc | norm ratio mc | cos mc per adapter layer | build s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in r["rows"].items():
        lo, gm = row["loss"], row["grad_mc"]
        per = " / ".join(f"{v['cos']:.2f}" for v in gm["per_layer"].values())
        lines.append(f"| {name} | {row['adapter_layers']} | {row['params'] / 1e6:.1f} | {row['params_fraction']:.2f} | "
                     f"{lo['text']['all']:.3f} | {lo['mc']['all']:.3f} | {lo['mc']['answer']:.3f} | "
                     f"{lo['mc']['eos']:.3f} | {row['grad_text']['overall']['cos']:.3f} | {gm['overall']['cos']:.3f} | "
                     f"{gm['overall']['sign_agree']:.3f} | {gm['overall']['norm_ratio']:.2f} | {per} | "
                     f"{row['build_s']:.0f} |")
    if r.get("drop_scan"):
        lines += ["", "## The full model with one middle layer removed (`--drop-scan`)", "",
                  "| layer removed | " + " | ".join(r["drop_scan"]) + " |", "|---|" + "---|" * len(r["drop_scan"]),
                  "| text loss | " + " | ".join(f"{v['text']:.2f}" for v in r["drop_scan"].values()) + " |",
                  "| mc loss | " + " | ".join(f"{v['mc']:.2f}" for v in r["drop_scan"].values()) + " |"]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = {"uniform": "o", "distill": "s", "scaleot": "^", "gradot": "D", "crash": "v"}
    for ax, key in zip(axes, ("grad_mc", "grad_text")):
        by = {}
        for name, row in r["rows"].items():
            tag = row["method"] + ("" if row["adapter_layers"] == "2,2" else f" (adapter {row['adapter_layers']})")
            by.setdefault(tag, []).append((row["params"] / 1e6, row[key]["overall"]["cos"], name))
        for tag, pts in by.items():
            pts.sort()
            ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], marker=markers.get(tag.split()[0], "x"),
                    label=tag, linestyle="-" if len(pts) > 1 else "")
        ax.axhline(1.0, color="grey", lw=0.5)
        floor = r.get("full", {}).get("full-ad2,2", {}).get("full_a_vs_b", {}).get(key.split("_")[1])
        if floor:
            ax.axhline(floor["overall"]["cos"], color="grey", ls=":", lw=1, label="full vs full, other batches")
        ax.set_xlabel("emulator parameters (M; full model %.1fM)" % (r.get("full_params", 0) / 1e6))
        ax.set_ylabel("adapter-gradient cosine, emulator vs full")
        ax.set_title({"grad_mc": "SciQ training loss (mc format)", "grad_text": "WikiText-2 validation text"}[key])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
