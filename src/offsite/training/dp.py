"""Differentially private fine-tuning of the adapter: DP-SGD (Abadi et al., 2016) with Opacus.

Method. Every optimizer step of ``offsite finetune --dp-epsilon/--dp-noise-multiplier``:

1. Poisson sampling: each of the N training examples joins the step's batch independently with
   probability q = batch_size * grad_accum / N (so the batch size varies and may be 0).
2. Per-example gradients g_i of the trainable parameters only (the adapter layers, or LoRA on them).
3. Clipping: g_i * min(1, C / ||g_i||), the norm taken over all trainable parameters together.
4. Noise and averaging: (sum_i clipped g_i + N(0, sigma^2 C^2 I)) / (batch_size * grad_accum),
   then the usual AdamW step and schedule (post-processing, free of privacy cost).

N steps of this subsampled Gaussian mechanism are (epsilon, delta)-DP for adding or removing one
example; Opacus' accountant (RDP, Mironov 2017, the default; or PRV, Gopi et al. 2021) bounds
epsilon, picks sigma for a target ``--dp-epsilon`` (``get_noise_multiplier``) and reports the final
epsilon of the steps actually run. The unit of privacy is one training example: a prompt/completion
pair, a multiple-choice question, or, for ``--format text``, one block of ``block_size`` tokens (a
document spanning k blocks gets the group-privacy bound of k examples, roughly k * epsilon).

How, with Opacus: per-example gradients come from ``opacus.grad_sample.GradSampleHooks`` attached
to the emulator (no wrapper): hooks sit only on modules holding trainable parameters, so the frozen
middle costs no per-example memory; ``nn.Linear`` (and LoRA's A/B) use Opacus' einsum rule, other
trained leaves (RMSNorm, GPT-2's Conv1D) Opacus' ``torch.func`` (vmap + grad) fallback. Clipping,
noise and averaging are ``opacus.optimizers.DPOptimizer``'s; a Poisson batch larger than
``batch_size`` is cut into chunks accumulated with ``signal_skip_step`` (the semantics of Opacus'
BatchMemoryManager), so ``--grad-accum`` only bounds memory.

Where this departs from ``PrivacyEngine.make_private``:

* No DataLoader: the Poisson mask of step t is drawn here, so a resumed run draws the same batches.
* Randomness: batches and noise come from generators seeded with (a secret, the step), the secret
  taken from ``secrets`` (the OS CSPRNG) and never from ``--seed``; a known seed would let anyone
  replay the noise. The secret is kept in the local checkpoint (delete it like the data), never in
  the artifact. The generators are torch's, not a CSPRNG, and Opacus' ``secure_mode`` (floating-
  point attack mitigation, Mironov 2012) is off.
* Loss: each example's mean token loss, summed over the batch (HF's loss averages all tokens of
  the batch, so one example's weight would depend on the others' lengths).
* What leaves the data owner: per-step training losses and validation losses are statistics of the
  private data outside the guarantee, so the artifact's ``training_log.json`` withholds them, and
  the adapter keeps its last weights rather than the best-validated ones. Validation examples are
  not trained on and not protected. N (through q) is treated as public and recorded.
* Refused (one error each, before any training): fp16 loss scaling (it would scale the per-example
  gradients that clipping bounds), gradient checkpointing (it reruns forwards Opacus' hooks record),
  delta >= 1/N, a rate q > 1.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import warnings

import torch

from ..core.errors import OffsiteError
from ..data.examples import collate
from ..data.token_loss import token_losses

ACCOUNTANTS = ("rdp", "prv")
"""Opacus accountants offered; ``rdp`` (the default) is the classic conservative bound, ``prv`` tighter."""
EPSILON_TOLERANCE = 0.01
"""How far below a target epsilon the chosen noise multiplier may land (Opacus' binary search)."""
UNITS = {"text": "one block of {block} tokens", "prompt": "one prompt/completion example",
         "mc": "one multiple-choice question"}


def require_opacus():
    """Import Opacus, or one error saying how to install it."""
    try:
        import opacus
    except ImportError:
        raise OffsiteError("DP-SGD (--dp-epsilon / --dp-noise-multiplier) needs Opacus; install the dp extra: "
                           "pip install 'offsite[dp]'") from None
    return opacus


def check_run(cfg, examples: int, precision) -> tuple:
    """Refuse what DP-SGD cannot honour once the data is known; ``(sample_rate, expected_batch)``.

    Args:
        cfg: the run's :class:`offsite.workflows.finetune.FinetuneConfig` (DP on).
        examples: N, the training examples (blocks for ``--format text``).
        precision: the run's :class:`offsite.core.precision.Policy`.

    Raises:
        OffsiteError: fp16 loss scaling, a sample rate above 1, or dp_delta >= 1/N.
    """
    if precision.scaler is not None:
        raise OffsiteError("DP-SGD cannot run with fp16 loss scaling (an fp16 emulator or --precision fp16): the "
                           "loss scale would multiply the per-example gradients that clipping bounds; use --precision "
                           "fp32 or bf16, or build the emulator with --dtype bfloat16 or float32")
    expected = cfg.batch_size * cfg.grad_accum
    if expected > examples:
        raise OffsiteError(f"DP-SGD samples each example with probability batch_size x grad_accum / examples = "
                           f"{expected}/{examples} > 1; lower --batch-size/--grad-accum or add data")
    if cfg.dp_delta >= 1 / examples:
        raise OffsiteError(f"dp_delta {cfg.dp_delta:g} must be < 1/N = {1 / examples:.3g} for the {examples} training "
                           f"examples (at delta 1/N a mechanism may publish a random example outright); typical: "
                           f"<= 1/N^1.1 = {examples ** -1.1:.2g}")
    return expected / examples, expected


def noise_for(cfg, sample_rate: float, steps: int) -> float:
    """sigma: ``dp_noise_multiplier`` as given, or the one Opacus finds for ``dp_epsilon`` after ``steps``.

    Raises:
        OffsiteError: no noise multiplier (up to Opacus' 1e6) reaches ``dp_epsilon``.
    """
    if cfg.dp_noise_multiplier is not None:
        return float(cfg.dp_noise_multiplier)
    from opacus.accountants.utils import get_noise_multiplier

    try:  # 0 steps spend nothing; sigma is then the one-step value, unused
        with warnings.catch_warnings():  # the search tries huge sigmas, whose best RDP order is off Opacus' grid
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return get_noise_multiplier(target_epsilon=cfg.dp_epsilon, target_delta=cfg.dp_delta,
                                        sample_rate=sample_rate, steps=max(1, steps),
                                        accountant=cfg.dp_accountant or "rdp", epsilon_tolerance=EPSILON_TOLERANCE)
    except ValueError as exc:  # "The privacy budget is too low."
        raise OffsiteError(f"dp_epsilon {cfg.dp_epsilon:g} at delta {cfg.dp_delta:g} is out of reach for {steps} steps "
                           f"at sample rate {sample_rate:.3g} even with huge noise ({exc}); raise --dp-epsilon or run "
                           f"fewer steps") from None


def _seed(secret: int, purpose: str, step: int) -> int:
    """A 63-bit seed for one step's generator; hashing keeps the streams of nearby steps unrelated."""
    digest = hashlib.sha256(f"{secret}:{purpose}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class DPSGD:
    """DP-SGD steps of one run, handed to :func:`offsite.training.loop.train` as ``private``.

    Args:
        model: the emulator (an HF causal LM, LoRA already injected when it trains LoRA).
        params: ``{name: parameter}`` that train (:func:`offsite.training.loop.select`).
        examples: the N training examples; cfg: the run's config; pad: the pad id.
        noise_multiplier, sample_rate, expected: sigma (:func:`noise_for`), q and q * N (:func:`check_run`).
        secret: seed material; default a fresh one from the OS (tests and resumption pass one).

    Raises:
        OffsiteError: a trained module Opacus cannot give per-example gradients for.

    Attributes:
        noise_multiplier: sigma; ``max_grad_norm``: C; ``sample_rate``: q; ``expected``: q * N.
        secret: seed material of batches and noise (checkpointed, never written to the artifact).
        accountant: the Opacus accountant fed by every privatized step.
    """

    def __init__(self, model, params: dict, examples: list, cfg, pad: int, device, noise_multiplier: float,
                 sample_rate: float, expected: int, secret: int | None = None):
        from opacus import __version__
        from opacus.accountants import create_accountant
        from opacus.grad_sample import GradSampleHooks

        self.model, self.params, self.examples, self.cfg = model, params, examples, cfg
        self.pad, self.device = pad, torch.device(device)
        self.noise_multiplier, self.sample_rate, self.expected = noise_multiplier, sample_rate, expected
        self.max_grad_norm = cfg.dp_max_grad_norm if cfg.dp_max_grad_norm is not None else cfg.max_grad_norm
        self.secret = secrets.randbits(63) if secret is None else secret
        self.accountant = create_accountant(cfg.dp_accountant or "rdp")
        self.version, self.optimizer = __version__, None
        try:  # "sum": the per-example gradients of the summed loss are the g_i themselves
            self.hooks = GradSampleHooks(model, batch_first=True, loss_reduction="sum", strict=True)
        except NotImplementedError as exc:
            raise OffsiteError(f"Opacus cannot compute per-example gradients of this emulator's trainable layers "
                               f"({exc}); DP-SGD is not available for it") from None
        self._noise = torch.Generator(device=self.device)

    def attach(self, optimizer) -> None:
        """Wrap the run's AdamW in Opacus' DPOptimizer (clipping, noise, averaging, accounting)."""
        from opacus.optimizers import DPOptimizer

        self.optimizer = DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier,
                                     max_grad_norm=self.max_grad_norm, expected_batch_size=self.expected,
                                     loss_reduction="mean", generator=self._noise)
        self.optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))

    def sample(self, step: int) -> list:
        """Indices of step ``step``'s Poisson batch (0-based step), reproducible from the secret."""
        g = torch.Generator().manual_seed(_seed(self.secret, "sample", step))
        return (torch.rand(len(self.examples), generator=g) < self.sample_rate).nonzero().flatten().tolist()

    def backward(self, step: int, autocast, fail) -> float:
        """Per-example gradients of step ``step``'s batch, clipped and summed chunk by chunk.

        Args:
            step: optimizer steps done so far.
            autocast: the precision policy's forward context.
            fail: ``fail(what)`` -> the exception to raise for a non-finite loss (before backward).

        Returns:
            The batch's mean example loss (for the progress bar; never shipped).
        """
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        chosen = self.sample(step)
        size = self.cfg.batch_size
        chunks = [chosen[i:i + size] for i in range(0, len(chosen), size)] or [[]]
        total = 0.0
        for k, chunk in enumerate(chunks):
            if chunk:
                batch = {n: t.to(self.device) for n, t in collate([self.examples[i] for i in chunk], self.pad).items()}
                with autocast:  # per-example means from the scored tokens only (offsite.data.token_loss)
                    loss = token_losses(self.model, batch, self.cfg.logits).per_example(len(chunk)).sum()
                value = loss.item()
                if not math.isfinite(value):  # before backward: a NaN must never reach the weights
                    raise fail(f"loss is {value}")
                with warnings.catch_warnings():  # the first adapter layer's input never needs a gradient
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss.backward()
                total += value
            else:  # an empty Poisson batch: no example, yet the step (noise only) still happens
                for p in self.params.values():
                    p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
            if k < len(chunks) - 1:  # clip and accumulate this chunk; noise and the update come once per step
                opt.signal_skip_step(True)
                opt.step()
                opt.zero_grad(set_to_none=True)
        return total / max(1, len(chosen))

    def privatize(self, step: int) -> float:
        """Clip, sum, add noise, average into ``p.grad`` (Opacus' pre_step); returns the noisy gradient's norm."""
        opt = self.optimizer
        opt.generator.manual_seed(_seed(self.secret, "noise", step))
        opt.pre_step()
        for p in self.params.values():  # free the per-example gradients before AdamW's step and validation
            p.grad_sample = p.summed_grad = None
        grads = [p.grad.detach().float().norm() for p in self.params.values() if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    def state(self) -> dict:
        """What a checkpoint needs to resume exactly: the secret and the accountant's history."""
        return {"secret": self.secret, "history": [list(h) for h in self.accountant.history]}

    def load_state(self, state) -> None:
        """Inverse of :meth:`state` (a checkpoint without it was not written by a DP-SGD run)."""
        if not isinstance(state, dict) or not isinstance(state.get("secret"), int):
            raise OffsiteError("the checkpoint holds no DP-SGD state (secret, accountant history); it cannot be "
                               "resumed as a DP-SGD run: delete it or pass --no-resume to start over")
        self.secret = state["secret"]
        self.accountant.history = [tuple(h) for h in state.get("history") or []]

    def close(self) -> None:
        """Remove Opacus' hooks and the attributes it added to the parameters."""
        self.hooks.cleanup()

    def record(self) -> dict:
        """The manifest's ``dp`` entry: the guarantee the accountant gives for the steps run."""
        cfg, history = self.cfg, self.accountant.history
        steps = sum(h[2] for h in history)
        epsilon = float(self.accountant.get_epsilon(delta=cfg.dp_delta)) if steps else 0.0
        return {"mechanism": "DP-SGD (Abadi et al. 2016): per-example clipping + Gaussian noise",
                "epsilon": epsilon, "delta": cfg.dp_delta, "target_epsilon": cfg.dp_epsilon,
                "noise_multiplier": self.noise_multiplier, "max_grad_norm": self.max_grad_norm,
                "sample_rate": self.sample_rate, "expected_batch_size": self.expected, "steps": steps,
                "examples": len(self.examples), "unit": UNITS[cfg.format].format(block=cfg.block_size),
                "accountant": cfg.dp_accountant or "rdp", "sampling": "poisson",
                "adjacency": "add or remove one example", "trained": "lora" if cfg.lora else "adapter layers",
                "library": f"opacus {self.version}"}


def public_log(log: dict) -> dict:
    """The training log as shipped under DP-SGD: steps and learning rates, no loss of private data."""
    out = {k: v for k, v in log.items() if k not in ("train", "val", "best_val_loss")}
    out.update(train=[{"step": e["step"], "lr": e["lr"]} for e in log["train"]], val=[], best_val_loss=None,
               withheld="DP-SGD: training and validation losses are statistics of the private data outside the "
                        "privacy guarantee; they stay with the data owner")
    return out


def summary(dp: dict) -> str:
    """One line of a manifest's ``dp`` entry for ``offsite inspect`` (tolerates a malformed entry)."""
    if not isinstance(dp, dict):
        return "malformed (not an object)"

    def num(key, fmt="{:.4g}"):
        value = dp.get(key)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return fmt.format(value) if ok else "?"

    return (f"DP-SGD epsilon {num('epsilon')} at delta {num('delta', '{:g}')}, noise multiplier "
            f"{num('noise_multiplier')}, clip {num('max_grad_norm', '{:g}')}, sample rate {num('sample_rate')}, "
            f"{num('steps', '{}')} steps ({dp.get('accountant', '?')} accountant, {dp.get('sampling', '?')} sampling)")
