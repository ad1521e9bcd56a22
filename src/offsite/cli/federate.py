"""``offsite federate``: emulator package + data split over N simulated data owners -> adapter artifact.

Flower's simulation engine on one machine (needs the fl extra); a real deployment runs the same
ServerApp/ClientApp through Flower (see :mod:`offsite.federate`).
"""

from __future__ import annotations

from .common import steps

LOCAL = ["format", "task", "lora", "lora_r", "lora_alpha", "max_steps", "epochs", "lr", "batch_size", "grad_accum",
         "warmup_steps", "schedule", "weight_decay", "max_grad_norm", "block_size", "precision",
         "gradient_checkpointing", "device", "seed"]
FEDERATION = ["clients", "rounds", "split", "dirichlet_alpha", "dirichlet_by", "fraction", "strategy", "mu",
              "val_data", "keep", "client_dp_noise_multiplier", "client_dp_clipping_norm", "client_dp_delta",
              "client_cpus", "client_gpus"]


def add_parser(sub) -> None:
    from ..core.precision import PRECISIONS
    from ..data.records import FORMATS
    from ..federate.partition import DIRICHLET_BY, SPLITS
    from .common import add_out, add_trust

    p = sub.add_parser("federate", help="federated fine-tuning of the adapter over N simulated data owners (Flower)",
                       epilog="needs the fl extra: pip install 'offsite[fl]'. --max-steps / --epochs count per round.")
    p.add_argument("--emulator", required=True, help="emulator package folder")
    p.add_argument("--data", required=True, help="training data file, split over the clients")
    fed = p.add_argument_group("federation")
    fed.add_argument("--clients", type=int, default=2, help="simulated data owners N (default 2)")
    fed.add_argument("--rounds", type=int, default=3, help="federated rounds (default 3)")
    fed.add_argument("--split", default="iid", choices=SPLITS, help="how --data is split over the clients")
    fed.add_argument("--dirichlet-alpha", type=float, default=0.5, help="Dirichlet concentration (smaller: more skew)")
    fed.add_argument("--dirichlet-by", default=None, choices=DIRICHLET_BY,
                     help="Dirichlet over mc labels, gold answers, or client sizes (contiguous runs of the file); "
                          "default answer for --format mc, else size")
    fed.add_argument("--fraction", type=float, default=1.0, help="share of clients trained per round, in (0, 1]")
    fed.add_argument("--strategy", default="fedavg", choices=["fedavg", "fedprox"])
    fed.add_argument("--mu", type=float, default=0.0, help="FedProx's proximal weight mu (with --strategy fedprox)")
    fed.add_argument("--val-data", default=None,
                     help="server-side validation file: the global adapter's loss after every round")
    fed.add_argument("--keep", default="last", choices=["last", "best"],
                     help="write the last round's adapter (default) or the best-validated one (needs --val-data)")
    fed.add_argument("--client-cpus", type=float, default=1.0, help="CPU cores per simulated client (default 1)")
    fed.add_argument("--client-gpus", type=float, default=0.0, help="GPUs per simulated client (default 0)")
    dp = p.add_argument_group("client-level differential privacy",
                              "Flower's DifferentialPrivacyServerSideFixedClipping: each client's update clipped to "
                              "--client-dp-clipping-norm, unweighted mean, Gaussian noise")
    dp.add_argument("--client-dp-noise-multiplier", type=float, default=None)
    dp.add_argument("--client-dp-clipping-norm", type=float, default=None)
    dp.add_argument("--client-dp-delta", type=float, default=None,
                    help="report epsilon at this delta (Opacus' RDP accountant; needs the dp extra)")
    local = p.add_argument_group("local fine-tuning (each client, each round)")
    local.add_argument("--format", default="text", choices=FORMATS, help="data format (default text)")
    local.add_argument("--task", default=None, help="for --format mc: use this eval task's prompts")
    local.add_argument("--lora", action="store_true", help="train LoRA on the adapter layers instead of all weights")
    local.add_argument("--lora-r", type=int, default=8)
    local.add_argument("--lora-alpha", type=int, default=16)
    local.add_argument("--max-steps", "--local-steps", dest="max_steps", type=steps, default=None,
                       help="local optimizer steps per round (overrides --epochs)")
    local.add_argument("--epochs", "--local-epochs", dest="epochs", type=float, default=1.0,
                       help="local epochs over the client's data per round (default 1)")
    local.add_argument("--lr", type=float, default=1e-4)
    local.add_argument("--batch-size", type=int, default=8)
    local.add_argument("--grad-accum", type=int, default=1)
    local.add_argument("--warmup-steps", type=int, default=0)
    local.add_argument("--schedule", default="constant", choices=["cosine", "linear", "constant"],
                       help="learning-rate schedule within each round (default constant, as in FedAvg)")
    local.add_argument("--weight-decay", type=float, default=0.0)
    local.add_argument("--max-grad-norm", type=float, default=1.0)
    local.add_argument("--block-size", type=int, default=512)
    local.add_argument("--precision", default="auto", choices=PRECISIONS)
    local.add_argument("--gradient-checkpointing", action="store_true")
    local.add_argument("--device", default="auto", help="where server and clients compute: auto | cpu | cuda | ...")
    local.add_argument("--seed", type=int, default=0, help="seeds the split, the client choice and every round")
    add_out(p, "adapter artifact folder to write")
    add_trust(p, "the emulator package")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..federate import federate

    settings = {k: getattr(args, k) for k in LOCAL + FEDERATION}
    out = federate(args.emulator, args.data, args.out, overwrite=args.overwrite, sign_key=args.sign_key,
                   trusted_keys=args.trusted_keys, **settings)
    print(f"adapter written to {out}")
    return 0
