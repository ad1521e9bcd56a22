"""The physical floor of a GradOT build: one forward + backward of the full model over the calibration
tokens, plus one SVD per middle attention matrix (what the method cannot avoid), as JSON.

Usage: python bench/gradot_floor.py MODEL [--windows 64] [--seq-len 128] [--batch-size 8] [--adapter-layers 2,2]

``bench/scale.py --floor`` runs it next to each GradOT build; the build's wall time over this floor
is the overhead of the implementation (issue 13's target: at most 2x).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv=None) -> int:
    import torch
    import torch.nn.functional as F

    from offsite.calibration import calibration_batches
    from offsite.families import get_family, get_layers, layer_linears
    from offsite.families.linears import linear_weight
    from offsite.model.loading import load_model
    from offsite.model.split import make_split

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--calibration", required=True)
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--adapter-layers", default="2,2")
    args = p.parse_args(argv)
    model, tok = load_model(args.model)
    family = get_family(model)
    split = make_split(model.config.num_hidden_layers, args.adapter_layers)
    batches = calibration_batches(args.calibration, tok, seq_len=args.seq_len, num_sequences=args.windows,
                                  batch_size=args.batch_size)
    for param in model.parameters():
        param.requires_grad_(True)  # every weight's gradient: more than GradOT needs, so a lower bound on cost is fair
    started = time.time()
    for ids in batches:
        logits = model(input_ids=ids, use_cache=False).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum").backward()
        model.zero_grad(set_to_none=True)
    forward_backward = time.time() - started
    started = time.time()
    layers = get_layers(model, family)
    for i in split.middle:
        for role, module in layer_linears(layers[i], family).items():
            if role.startswith("attn."):
                torch.linalg.svd(linear_weight(module, family).detach().double(), full_matrices=False)
    svd = time.time() - started
    print(json.dumps({"forward_backward_s": round(forward_backward, 1), "svd_s": round(svd, 1),
                      "floor_s": round(forward_backward + svd, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
