"""Settings of adapter fine-tuning (data owner side)."""

from __future__ import annotations

import dataclasses

from ..core.errors import OffsiteError
from ..core.precision import PRECISIONS
from ..core.schedule import SCHEDULES
from ..core.settings_types import check_range, check_types
from ..data.token_loss import MODES as LOGITS
from .dp import ACCOUNTANTS

TRAIN_ADAPTER = ("all", "top", "bottom")


def _runtime(default):
    """A setting that says how a run executes, not what it computes: left out of the resume key, so a
    checkpoint resumes whatever it is now (the loss is the same up to float rounding)."""
    return dataclasses.field(default=default, metadata={"resume_key": "runtime"})


def _by_content(default=None):
    """A file setting that enters the resume key by its content, not by its path: a moved file still
    resumes, another file at the same path does not (offsite.training.checkpoint.run_key)."""
    return dataclasses.field(default=default, metadata={"resume_key": "content"})


@dataclasses.dataclass
class FinetuneConfig:
    """Every setting of ``offsite finetune``; defaults follow Offsite-Tuning's recipe where it has one."""

    format: str = "text"
    """Data format: text, prompt or mc."""
    task: str | None = None
    """For --format mc: build prompts with this evaluation task's spec (same prompts as offsite eval)."""
    val_data: str | None = _by_content(None)
    """Validation file in the same format; default: hold out val_fraction of the training data."""
    val_fraction: float = 0.05
    """Share of training examples held out for validation when val_data is absent (0 = no validation)."""
    val_limit: int = 64
    """At most this many validation examples: each validation costs a forward pass over them, about
    val_limit / 3 training examples; 5 validations of 64 are ~7 % of a 200-step run at batch 8."""
    lora: bool = False
    """Train LoRA on the adapter layers (PEFT) instead of all their weights."""
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch's input."""
    lora_targets: list | None = None
    """Module names LoRA targets; default every linear of the adapter layers."""
    init_adapter: str | None = _by_content(None)
    """An adapter artifact trained on this same emulator to start from (default: the emulator's own
    adapter layers); e.g. one the model owner tuned on public text, so that the data owner's run
    begins where the emulator's shortfall is already absorbed."""
    train_adapter: str = "all"
    """Which adapter layers train: all, top (those above the middle) or bottom (those below it); the
    others stay frozen and travel back unchanged. On SmolLM2-135M the bottom adapter's gradient through
    an emulator has cosine ~0 with its gradient through the full model at every emulator measured,
    while the top adapter's reaches 0.8-0.95 (bench/results/real_diagnose); yet training the top alone
    gave a worse plug-in there (71.5 vs 76.0 at 18 of 26 layers, bench/results/real_transfer), so all
    stays the default."""
    lr: float = 1e-4
    weight_decay: float = 0.0
    epochs: float = 1.0
    max_steps: int | None = None
    """Optimizer steps; overrides epochs. 0 writes the untouched adapter."""
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int = 0
    schedule: str = "cosine"
    max_grad_norm: float = 1.0
    block_size: int = 512
    precision: str = "auto"
    """How the forward pass computes; trained weights are always fp32 masters, frozen ones keep the
    checkpoint dtype, the artifact is written in it (offsite.core.precision). auto: on CUDA fp16 autocast
    with loss scaling for fp16 models, else bf16 autocast where supported; on CPU bf16 autocast for
    bf16 models, else none (fp16 models: the adapter computes in fp32, with loss scaling). fp32: no
    autocast, each layer in its own dtype. bf16: bf16 autocast. fp16: fp16 autocast + loss scaling."""
    gradient_checkpointing: bool = False
    logits: str = _runtime("scored")
    """scored: the LM head and the loss only at the tokens that are scored (the answer of mc/prompt
    data; text in chunks of positions); full: logits for every position, the model's own loss (the
    path before offsite.data.token_loss). Equal up to float rounding; scored needs far less memory."""
    pass_tokens: int | None = _runtime(None)
    """Padded tokens per forward/backward pass: a micro-batch runs in parts of similar length within
    this budget (offsite.training.parts; same examples per step, same loss up to rounding). None =
    auto: 512 on CPU, whole micro-batches on accelerators; 0 = whole micro-batches."""
    eval_every: int | None = None
    """Validate every N steps and at the end (default: 5 times per run); the best validation loss wins."""
    save_every: int | None = _runtime(None)
    """Write a resumable checkpoint every N steps (default: every 10 minutes of training)."""
    resume: bool = _runtime(True)
    """Resume from <out>.ckpt when it exists and matches the settings."""
    keep_checkpoint: bool = _runtime(False)
    """Keep <out>.ckpt after the artifact is written (default: removed)."""
    device: str = _runtime("auto")
    seed: int = 0
    progress: bool = _runtime(True)
    dp_epsilon: float | None = None
    """DP-SGD (offsite.training.dp) to this target epsilon: the noise multiplier is chosen so that the
    run ends at an epsilon within 0.01 below it (at dp_delta). Excludes dp_noise_multiplier."""
    dp_delta: float | None = None
    """The delta of the (epsilon, delta) guarantee; required with DP-SGD, < 1 / training examples."""
    dp_noise_multiplier: float | None = None
    """DP-SGD with this noise multiplier sigma (noise std sigma * C); the epsilon it gives is reported."""
    dp_max_grad_norm: float | None = None
    """DP-SGD's per-example clipping bound C (default max_grad_norm); replaces the batch clipping."""
    dp_accountant: str | None = None
    """Opacus accountant bounding epsilon: rdp (default) or prv."""

    @property
    def dp(self) -> bool:
        """Whether the run is DP-SGD (a target epsilon or a noise multiplier is given)."""
        return self.dp_epsilon is not None or self.dp_noise_multiplier is not None

    def __post_init__(self):
        # Types first: the range checks below would crash on a string or pass a float step count.
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in check_types(type(self), given, "fine-tuning setting").items():
            setattr(self, name, value)
        if self.schedule not in SCHEDULES:
            raise OffsiteError(f"schedule {self.schedule!r} unknown; allowed: {', '.join(SCHEDULES)}")
        if self.logits not in LOGITS:
            raise OffsiteError(f"logits {self.logits!r} unknown; allowed: {', '.join(LOGITS)}")
        if self.precision not in PRECISIONS:
            raise OffsiteError(f"precision {self.precision!r} unknown; allowed: {', '.join(PRECISIONS)}")
        if self.pass_tokens is not None:
            check_range("pass_tokens", self.pass_tokens, at_least=0)  # 0 = whole micro-batches
        if self.train_adapter not in TRAIN_ADAPTER:
            raise OffsiteError(f"train_adapter {self.train_adapter!r} unknown; allowed: {', '.join(TRAIN_ADAPTER)}")
        for name in ("batch_size", "grad_accum", "block_size", "lora_r", "val_limit"):
            check_range(name, getattr(self, name), at_least=1)
        if self.max_steps is not None:
            check_range("max_steps", self.max_steps, at_least=0)
        check_range("val_fraction", self.val_fraction, at_least=0, below=1)
        # A negative clipping norm makes torch flip every gradient (ascent); the rest would train nothing
        # or crash inside AdamW/PEFT after the emulator is loaded.
        for name in ("lr", "max_grad_norm", "epochs", "lora_alpha"):
            check_range(name, getattr(self, name), above=0)
        for name in ("warmup_steps", "weight_decay"):
            check_range(name, getattr(self, name), at_least=0)
        check_range("lora_dropout", self.lora_dropout, at_least=0, below=1)
        targets = self.lora_targets
        if targets is not None and (not targets or not all(isinstance(t, str) for t in targets)):
            raise OffsiteError(f"lora_targets must be a non-empty list of module names (strings), got {targets!r}")
        self._check_dp()

    def _check_dp(self) -> None:
        """Refuse DP-SGD settings Opacus cannot honour, one error each (the data-dependent ones: dp.check_run)."""
        given = [name for name in DP_FIELDS if getattr(self, name) is not None]
        if self.dp_epsilon is not None and self.dp_noise_multiplier is not None:
            raise OffsiteError("give dp_epsilon (--dp-epsilon: the noise is chosen to reach it) or dp_noise_multiplier "
                               "(--dp-noise-multiplier: the epsilon it gives is reported), not both")
        if not self.dp:
            if given:
                raise OffsiteError(f"{', '.join(given)} given without dp_epsilon or dp_noise_multiplier; DP-SGD runs "
                                   "only with one of them (--dp-epsilon or --dp-noise-multiplier)")
            return
        if self.dp_delta is None:
            raise OffsiteError("DP-SGD needs dp_delta (--dp-delta), the delta of the (epsilon, delta) guarantee; "
                               "pick it well below 1 / number of training examples, e.g. 1e-5")
        for name in ("dp_epsilon", "dp_noise_multiplier", "dp_max_grad_norm"):
            if getattr(self, name) is not None:
                check_range(name, getattr(self, name), above=0)
        check_range("dp_delta", self.dp_delta, above=0, below=1)
        if self.dp_accountant is not None and self.dp_accountant not in ACCOUNTANTS:
            raise OffsiteError(f"dp_accountant {self.dp_accountant!r} unknown; allowed: {', '.join(ACCOUNTANTS)}")
        if self.gradient_checkpointing:
            raise OffsiteError("DP-SGD cannot use gradient checkpointing: it reruns each layer's forward inside "
                               "backward, and Opacus' per-example hooks would record every layer twice; drop "
                               "--gradient-checkpointing (or lower --batch-size)")
        if self.precision == "fp16":
            raise OffsiteError("DP-SGD cannot run with --precision fp16: its loss scaling would multiply the "
                               "per-example gradients that clipping bounds; use fp32, bf16 or auto")


DP_FIELDS = ("dp_epsilon", "dp_delta", "dp_noise_multiplier", "dp_max_grad_norm", "dp_accountant")
"""Settings of DP-SGD; left out of recorded settings and resume keys of a run without it (so those stay as before)."""


def resume_settings(cfg: FinetuneConfig) -> dict:
    """The recorded settings a checkpoint must match to be resumed: all but those declared ``_runtime``
    or ``_by_content`` (the run key holds the content of the latter)."""
    keep = {f.name for f in dataclasses.fields(cfg) if "resume_key" not in f.metadata}
    return {k: v for k, v in recorded(cfg).items() if k in keep}


def recorded(cfg: FinetuneConfig) -> dict:
    """``dataclasses.asdict(cfg)``, without the DP-SGD fields when DP-SGD is off."""
    settings = dataclasses.asdict(cfg)
    return settings if cfg.dp else {k: v for k, v in settings.items() if k not in DP_FIELDS}
