"""``offsite finetune``: emulator package + data -> adapter artifact.

Data parallel over several processes: the same command under ``torchrun --nproc_per_node N -m
offsite.cli finetune ...`` (``--batch-size`` is then the global batch; see
:mod:`offsite.training.distributed`).
"""

from __future__ import annotations

import dataclasses

from .common import steps


def add_parser(sub) -> None:
    from ..data.records import FORMATS
    from .common import add_out

    p = sub.add_parser("finetune", help="fine-tune the adapter against the frozen emulator (data owner)",
                       epilog="several processes (data parallel): torchrun --nproc_per_node N -m offsite.cli "
                              "finetune ... (--batch-size is the global batch, divisible by N; rank 0 writes)")
    p.add_argument("--emulator", required=True, help="emulator package folder")
    p.add_argument("--data", required=True, help="training data file")
    p.add_argument("--format", default="text", choices=FORMATS, help="data format (default text)")
    p.add_argument("--task", default=None, help="for --format mc: use this eval task's prompts")
    p.add_argument("--val-data", default=None, help="validation file (default: hold out 5%% of --data)")
    p.add_argument("--lora", action="store_true", help="train LoRA on the adapter layers instead of all weights")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--init-adapter", default=None,
                   help="start from this adapter artifact (trained on the same emulator) instead of the emulator's own")
    from ..training.config import TRAIN_ADAPTER

    p.add_argument("--train-adapter", default="all", choices=TRAIN_ADAPTER,
                   help="which adapter layers train; the others stay frozen (default all)")
    p.add_argument("--max-steps", type=steps, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=8,
                   help="examples per micro-batch; under N processes the global one, split N ways")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant"])
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--block-size", type=int, default=512)
    from ..core.precision import PRECISIONS

    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: bf16/fp16 autocast where the device and model dtype suit it; trained weights are "
                        "always fp32 masters (see offsite.core.precision)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--logits", default="scored", choices=["scored", "full"],
                   help="scored: the LM head and loss only at the scored tokens (default); full: every position, "
                        "the model's own loss (equal up to rounding, far more memory)")
    p.add_argument("--pass-tokens", type=int, default=None,
                   help="padded tokens per forward/backward pass: the micro-batch runs in parts of similar length "
                        "(default: 512 on CPU, whole micro-batches on GPUs; 0 = whole)")
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--save-every", type=int, default=None)
    p.add_argument("--no-resume", dest="resume", action="store_false", help="ignore an existing <out>.ckpt")
    p.add_argument("--device", default="auto",
                   help="where the emulator trains: auto (CUDA when present, else CPU) | cpu | cuda | cuda:N | mps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    dp = p.add_argument_group(
        "differential privacy", "DP-SGD with Opacus (needs the dp extra: pip install 'offsite[dp]'): Poisson batches "
        "at rate batch-size x grad-accum / examples (for --format text an example is one block), per-example clipping, "
        "Gaussian noise; the manifest records the accountant's epsilon, the adapter keeps its last weights and its "
        "training log carries no losses")
    dp.add_argument("--dp-epsilon", type=float, default=None,
                    help="train with DP-SGD to this target epsilon (the noise is chosen to reach it)")
    dp.add_argument("--dp-noise-multiplier", type=float, default=None,
                    help="train with DP-SGD at this noise multiplier instead; the epsilon reached is reported")
    dp.add_argument("--dp-delta", type=float, default=None,
                    help="delta of the (epsilon, delta) guarantee; required with DP-SGD, < 1/training examples")
    dp.add_argument("--dp-max-grad-norm", type=float, default=None,
                    help="per-example clipping bound C (default --max-grad-norm)")
    dp.add_argument("--dp-accountant", default=None, choices=["rdp", "prv"],
                    help="Opacus accountant bounding epsilon (default rdp)")
    add_remaining_settings(p)
    add_out(p, "adapter artifact folder to write")
    from .common import add_trust

    add_trust(p, "the emulator package")
    p.set_defaults(func=run)


def add_remaining_settings(p) -> None:
    """A flag for every :class:`FinetuneConfig` field the flags above do not cover (read off the
    dataclass: its docstring as help, its default shown; passed only when given)."""
    import argparse

    from ..training.config import FinetuneConfig
    from .common import field_docs

    covered = {a.dest for a in p._actions}
    docs = field_docs(FinetuneConfig)
    group = p.add_argument_group("more settings (the rest of FinetuneConfig)")
    for f in dataclasses.fields(FinetuneConfig):
        if f.name in covered:
            continue
        flag, text = f"--{f.name.replace('_', '-')}", f"{docs.get(f.name, '')} (default: {f.default})".strip()
        kind = str(f.type).replace(" ", "")
        extra = ({"action": "store_true"} if kind == "bool" else
                 {"nargs": "+", "metavar": "NAME"} if kind.startswith("list") else
                 {"type": {"int": int, "float": float}.get(kind.split("|")[0], str), "metavar": kind.upper()})
        group.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, help=text.replace("%", "%%"), **extra)


def run(args) -> int:
    from ..workflows.finetune import FinetuneConfig, finetune

    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    out = finetune(args.emulator, args.data, args.out, overwrite=args.overwrite, sign_key=args.sign_key,
                   trusted_keys=args.trusted_keys, **{k: v for k, v in vars(args).items() if k in fields})
    from ..training.distributed import writes

    if writes():
        print(f"adapter written to {out}")  # once per run, by the process that wrote it
    return 0
