"""GradOT: training-free, gradient-preserving emulators (the ``"gradot"`` method).

Paper: Yao et al., "GradOT: Training-free Gradient-preserving Offsite-tuning for Large Language
Models", ACL 2025 (arXiv 2507.04455). No official code was found; this follows the paper as far as
secondary sources confirm it (../shared/research/papers.md §5) and documents every choice.

Algorithm: one streamed forward/backward pass of the *full* model over public calibration text
gathers, for every linear of every middle layer, the K-FAC factors A, G and the mean gradient g
(:mod:`offsite.calibration`). Each compression δ is scored by GCS (:mod:`.gcs`; the paper's
||G δ A||_1 − λ<g, δ>): small gradient change for the adapter (utility), large loss increase (privacy).
Attention projections get Dynamic Rank Decomposition (SVD; the top 5% of singular components are
always kept, the rest of the rank budget goes to the components whose removal has the highest
GCS; stored as two factors). MLPs get Selective Channel Pruning (remove the intermediate channels
with the lowest GCS). Every middle layer stays, compressed; adapter layers stay whole.

Choices where the sources are silent (each is a setting):

* Calibration: public text, default War and Peace from the shared data (disjoint from every
  evaluation and fine-tuning set here), 64 windows x 128 tokens, seed 0. The loss is the plain
  next-token LM loss of the full model (adapters as they are) on that text.
* Size: ``param_budget`` = fraction of every middle linear's parameters kept (default 0.25: on the
  demo world the same emulator size as uniform drop's default, 0.68 of the full model).
  Attention rank r = floor(budget * out * in / (out + in)) (factors cost r(out+in)); MLP keeps
  round(budget * channels) channels. ``rank_ratio`` (fraction of full rank) and ``channel_ratio``
  set the two parts directly instead; a part without its ratio uses the default budget. A rank
  whose factors would cost at least the dense matrix is stored dense (the same product).
* Score: ``gcs_form="relative"`` (default; see :mod:`.gcs`): shares of the matrix's gradient change
  ‖GδA‖₁ and of its K-FAC curvature loss ½ tr(δᵀGδA), so λ is an exchange rate between utility and
  privacy on one scale; ``first_order`` adds the paper's noisy <g, δ>; ``gcs_form="paper"`` is the
  published ‖GδA‖₁ − λ<g, δ> (mean-normalised per selection).
* Defaults λ_attn = λ_mlp = 4 and budget 0.25, chosen by measurement (``bench/choose_defaults.py``,
  ``bench/results/choose_defaults/summary.md``): of budgets {0.25, 0.4} x λ {0.25, 1, 2, 4} on three
  demo worlds (validation people), the best mean plug-in among the points whose mean Δ = plug-in −
  emulator FT reached 40 points (ties: the larger Δ): plug-in 92.6, Δ 64.4. λ = 0.25 keeps most of what
  the model knows (emulator FT 71.1, Δ 20.0). On the reference Llama (``bench/gcs_selection.py``,
  WikiText-2) λ moves gradient cosine and loss monotonically (λ 0: 0.890 / 5.761; λ 4: 0.630 / 5.990 on
  test windows); no λ beats both baselines on both at once: magnitude truncation is beaten on both
  for λ <= 0.25, random selection lies on the GCS curve (about λ 1.5).
* Mixture of experts (not in the paper, which prunes dense MLPs): each expert is a gated MLP of its
  own, scored on the tokens the router sent it (the sweep runs the experts unfused, see
  :mod:`offsite.families.moe`) and pruned to its own channels; every expert keeps the same number
  (rectangular fused tensors), rounded to a multiple of 8. Router and shared experts stay whole; an
  expert no calibration token reaches is pruned by channel norm (``by_norm`` in the plan).
* The 5% floor is per matrix (``top_fraction``); fused qkv is one matrix (see :mod:`.lowrank`).
  q, k, v and o are all decomposed; biases are kept and not scored.
* ``scoring="magnitude"`` replaces GCS by the classic baselines at the same sizes: top singular
  values (plain truncated SVD) and channel-weight-norm pruning. ``scoring="random"`` keeps the
  same floor and sizes and draws the rest at random (seeded): the baseline any scoring must beat
  to mean something. Used by tests and the benchmark.
* GradOT plans layer by layer: ``plan`` hands each middle layer's part to ``on_layer`` as soon as its
  terms are known, with the SVD the terms were made from, and the build compresses that layer at
  once (:meth:`GradOT.apply_layer`; one SVD per matrix); ``apply`` alone (a plan from elsewhere)
  decomposes again, with the same result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path

import torch

from ....calibration import (STATS_DTYPES, backward_sweep, capture_boundaries, capture_boundaries_layerwise,
                             peak_memory_mb, resolve_calibration)
from ....core.errors import OffsiteError
from ....core.progress import bar
from ....families import get_layers, layer_linears
from ....model.loading import load_tokenizer
from ...base import EmulatorBuilder, keep_layers, layer_entries, register
from ...calibrated import CalibrationSettings
from ...importance_cache import cache_key, load_terms, save_terms
from ...inputs import BuildInputs
from ...lowrank import restructure_linears
from . import gcs
from .select import attention_terms, compress_layer, expert_terms, layer_part, mlp_terms, select

DEFAULT_BUDGET = 0.25
TERMS_VERSION = 3  # bump when what the terms mean changes, so older caches are not reused
SCORINGS = ("gcs", "magnitude", "random")


def _fraction(name, value, allow_none=True):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise OffsiteError(f"gradot {name} must be a number in (0, 1], got {value!r}")
    return float(value)


@dataclasses.dataclass
class GradOTConfig:
    """Settings of GradOT (see the module docstring for what each default stands for)."""

    param_budget: float | None = None
    """Fraction of every middle linear's parameters kept (default 0.25 when no ratio is given)."""
    rank_ratio: float | None = None
    """Attention: fraction of the full rank kept (instead of param_budget)."""
    channel_ratio: float | None = None
    """MLP: fraction of the intermediate channels kept (instead of param_budget)."""
    lambda_attn: float = 4.0
    """λ of the GCS loss-increase term for attention (rank decomposition); 0 = gradient only."""
    lambda_mlp: float = 4.0
    """λ of the GCS loss-increase term for the MLP (channel pruning)."""
    top_fraction: float = 0.05
    """Fraction of each matrix's rank (largest singular values) always kept."""
    scoring: str = "gcs"
    """'gcs' (GradOT), 'magnitude' (top singular values + channel-norm pruning) or 'random' (same floor and
    sizes, components/channels drawn at random from the seed): the two baselines GCS must beat."""
    gcs_form: str = "relative"
    """How GCS weighs its two terms: 'relative' (shares of the matrix's gradient change and K-FAC loss
    increase; λ is an exchange rate) or 'paper' (the published ||GδA||₁ − λ<g, δ>, mean-normalised)."""
    first_order: bool = False
    """Relative form: add the first-order <g, δ> to the loss term (noisy at a trained model)."""
    cache_dir: str | None = None
    """Folder keeping the GCS terms of this model, split and calibration, so later builds with other
    sizes, λ or form skip the calibration sweep (``offsite frontier`` uses it)."""
    seq_len: int = 128
    """Tokens per calibration window."""
    num_sequences: int = 64
    """Calibration windows."""
    batch_size: int = 8
    """Calibration windows per forward/backward batch."""
    seed: int = 0
    """Seed of the calibration window draw."""
    stats_dtype: str = "float32"
    """Accumulation dtype of the K-FAC statistics: float32 (default) or float64. Chosen by measurement
    (bench/stats_precision.py, reference Llama, 512 windows = 65k tokens): fp32 terms are within 5e-7
    (relative) of fp64's and select the same components and channels in every matrix, at half the
    memory and 0.7x the sweep time."""

    def __post_init__(self):
        for name in ("param_budget", "rank_ratio", "channel_ratio"):
            setattr(self, name, _fraction(name, getattr(self, name)))
        if self.param_budget is not None and (self.rank_ratio is not None or self.channel_ratio is not None):
            raise OffsiteError("gradot takes either param_budget or rank_ratio/channel_ratio, not both")
        for name in ("lambda_attn", "lambda_mlp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise OffsiteError(f"gradot {name} must be a number >= 0, got {value!r}")
        self.top_fraction = _fraction("top_fraction", self.top_fraction, allow_none=False)
        if self.scoring not in SCORINGS:
            raise OffsiteError(f"gradot scoring must be one of {', '.join(SCORINGS)}, got {self.scoring!r}")
        if self.gcs_form not in gcs.FORMS:
            raise OffsiteError(f"gradot gcs_form must be one of {', '.join(gcs.FORMS)}, got {self.gcs_form!r}")
        if self.stats_dtype not in STATS_DTYPES:
            raise OffsiteError(f"gradot stats_dtype must be one of {', '.join(STATS_DTYPES)}, got {self.stats_dtype!r}")
        CalibrationSettings.of(self)
        if self.seq_len < 2:
            raise OffsiteError(f"calibration seq_len must be at least 2 (a next-token loss), got {self.seq_len}")

    def target_rank(self, out_f: int, in_f: int) -> int:
        """Rank kept for an ``(out, in)`` attention matrix."""
        full = min(out_f, in_f)
        if self.rank_ratio is not None:
            return max(1, min(full, round(self.rank_ratio * full)))
        budget = self.param_budget or DEFAULT_BUDGET
        return full if budget >= 1 else max(1, min(full, int(budget * out_f * in_f / (out_f + in_f))))

    def target_channels(self, channels: int) -> int:
        ratio = self.channel_ratio if self.channel_ratio is not None else (self.param_budget or DEFAULT_BUDGET)
        return max(1, min(channels, round(ratio * channels)))


def _batches(model, config: GradOTConfig, inputs: BuildInputs):
    """Calibration batches (through the loader every calibrated method shares) and the record of their source."""
    given = isinstance(inputs.calibration, (list, tuple))
    if inputs.tokenizer is None and not given:  # plan() called directly on a model loaded from a folder

        inputs.tokenizer = load_tokenizer(str(getattr(model, "name_or_path", "") or ""))
    settings = CalibrationSettings.of(config)
    batches = inputs.batches("gradot", settings)
    if given:
        return batches, {"path": None, "sequences": sum(len(b) for b in batches)}
    path = resolve_calibration(inputs.calibration, "gradot")
    return batches, {"path": str(path), "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
                     "sequences": settings.num_sequences, "seq_len": settings.seq_len, "seed": settings.seed}


@register
class GradOT(EmulatorBuilder):
    name = "gradot"
    supports_stream = True
    size_knob = "param_budget"

    def size_points(self, middle: int) -> list:
        return [0.25, 0.4, 0.6]

    config_cls = GradOTConfig
    needs_calibration = True
    compresses_kept_layers = True
    """Every middle layer stays, compressed: one leaving unchanged is refused (``offsite.emulator.disclosure``)."""

    def plan(self, model, family, split, config, inputs=None, on_layer=None) -> dict:
        """Calibrate (streamed, or from ``config.cache_dir``) and decide every middle linear's kept
        components / channels.

        Selection is per matrix, so with ``on_layer`` each middle layer's part (``{"linears": [...],
        "mlp": [...]}``) is handed over as soon as its terms are known, with the SVDs they were made
        from as ``scratch``: the build compresses the layer then and there (:meth:`apply_layer`), and
        peak memory holds one layer's statistics and factors. With ``inputs.stream`` the base layers
        are read from disk as the calibration forward and the sweep reach them (see
        :mod:`offsite.calibration.layerwise`).

        Args:
            inputs: the calibration (a text file, None for the default public corpus, or ready
                ``LongTensor (batch, seq)`` batches) and the model's tokenizer (read from
                ``model.name_or_path`` when None).
        """
        inputs = BuildInputs() if inputs is None else inputs
        started = time.time()
        linears, mlps = [], []

        def on_terms(index, layer_terms, svds):
            lin, mlp = select(layer_terms, config)
            linears.extend(lin)
            mlps.extend(mlp)
            on_layer(index, {"linears": lin, "mlp": mlp}, svds)

        terms, record = self.terms(model, family, split, config, inputs,
                                   on_terms=on_terms if on_layer is not None else None)
        if on_layer is None:
            linears, mlps = select(terms, config)
        settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        return {
            "layers": layer_entries(split, list(split.middle)),
            "linears": sorted(linears, key=lambda e: (e["layer"], e["role"])),
            "mlp": sorted(mlps, key=lambda e: e["layer"]),
            "settings": settings,
            "calibration": record,
            "build": {"stats_seconds": round(time.time() - started, 2), **peak_memory_mb()},
        }

    def terms(self, model, family, split, config, inputs=None, on_terms=None) -> tuple:
        """Everything selection needs from the model, for every middle matrix (see :func:`select`).

        GCS runs the streamed calibration sweep (or reads a matching ``cache_dir``); the baselines
        read the weights alone and use no calibration text.

        Args:
            inputs: calibration and tokenizer (see :meth:`plan`), and ``inputs.stream``, a streamed
                base model: each middle layer is materialised while its terms are made (the build
                parks it once applied, or the sweep releases it).
            on_terms: ``on_terms(index, layer_terms, svds)`` called once per middle layer as soon as
                its terms are known (``svds``: the factors made for them, ``{"<layer>.<role>": svd}``).

        Returns:
            ``(terms, calibration record)``.
        """
        inputs = BuildInputs() if inputs is None else inputs
        stream = inputs.stream
        layers = get_layers(model, family)
        terms = {"attn": {}, "mlp": {}, "experts": {}}

        def layer_done(index, stats, need_stats):
            if stream is not None:
                stream.materialize(index)
            svds = {} if on_terms is not None else None
            attention = [(r, m) for r, m in layer_linears(layers[index], family).items() if r.startswith("attn.")]
            # One step per attention matrix (its SVD dominates) plus one for the MLP. The MLP goes first
            # and each factor is dropped once used (the sweep hands over the only references), so the
            # MLP's f x f factors are gone before the attention SVDs (kept for compression) pile up:
            # the layer's peak is the larger of the two phases, not their sum.
            with bar(len(attention) + 1, f"{config.scoring} terms, layer {index}", "matrix", leave=False) as step:
                if family.mlp:
                    terms["mlp"][str(index)] = mlp_terms(layers[index], family, stats, need_stats)
                for e, entry in expert_terms(layers[index], family, stats, need_stats).items():
                    terms["experts"][f"{index}.{e}"] = entry
                for role in [r for r in stats if not r.startswith("attn.")]:
                    del stats[role]
                step.update()
                for role, module in attention:
                    key = f"{index}.{role}"
                    terms["attn"][key] = attention_terms(module, family, stats.pop(role, None), need_stats, svds, key)
                    step.update()
            if on_terms is not None:
                on_terms(index, layer_part(terms, index), svds)

        if config.scoring != "gcs":
            for index in split.middle:
                layer_done(index, {}, False)
            return terms, {"skipped": f"scoring={config.scoring} reads the weights only"}
        batches, source = _batches(model, config, inputs)
        with_grad = config.gcs_form == "paper" or config.first_order  # the only users of <g, δ>
        key = None
        if config.cache_dir:  # the key hashes every weight: only when a cache asks for it
            weights = None if stream is None else stream.weight_fingerprint()
            key = cache_key(model, split, batches, {"terms": TERMS_VERSION, "stats_dtype": config.stats_dtype,
                                                    "with_grad": with_grad}, fingerprint=weights)
        # one sub-folder per question (model, split, text, dtype, with/without the gradient): a frontier
        # over forms, or first_order on and off, shares one cache_dir
        folder = Path(config.cache_dir) / f"gcs-terms-{key[:16]}" if config.cache_dir else None
        cached = load_terms(folder, key) if folder else None
        if cached is not None:
            for index in split.middle if on_terms is not None else ():
                on_terms(index, layer_part(cached["terms"], index), {})
            return cached["terms"], {**source, **cached["record"], "cache_dir": str(config.cache_dir)}
        bounds = (capture_boundaries(model, family, batches) if stream is None else
                  capture_boundaries_layerwise(model, family, batches, stream))
        if stream is not None:
            stream.release_resident()  # the sweep runs layers only; the writer reads embeddings/head back
        backward_sweep(model, family, bounds, split.middle, lambda i, stats: layer_done(i, stats, True),
                       STATS_DTYPES[config.stats_dtype], with_grad, stream=stream)
        record = {"tokens": bounds.tokens, "loss": round(bounds.loss, 6)}
        if config.cache_dir:
            save_terms(folder, key, terms, record)
            record = {**record, "cache_dir": str(config.cache_dir)}
        return terms, {**source, **record}

    def apply(self, model, family, split, plan, inputs=None):
        """Compress every middle layer the plan names (but those in ``inputs.applied``), then keep the plan's layers."""
        done = set() if inputs is None else inputs.applied
        layers = get_layers(model, family)
        for index in sorted({e["layer"] for e in plan["linears"] + plan["mlp"]} - done):
            part = {"linears": [e for e in plan["linears"] if e["layer"] == index],
                    "mlp": [e for e in plan["mlp"] if e["layer"] == index]}
            self.apply_layer(layers[index], family, index, part, {})
        keep_layers(model, family, [e["source"] for e in plan["layers"]])
        return model

    def apply_layer(self, layer, family, index, part, scratch) -> None:
        """Channel pruning and rank decomposition of one middle layer; ``scratch``: the SVDs made for its
        terms (``{"<layer>.<role>": svd}``, used up), or ``{}`` to decompose here."""
        with torch.no_grad():
            compress_layer(layer, family, part["linears"], part["mlp"], scratch)

    def restructure(self, model, family, plan) -> None:
        restructure_linears(model, family, plan)
