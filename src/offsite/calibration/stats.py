"""Per-linear calibration statistics (K-FAC factors, weight gradients) and damped factorisations.

For a linear ``y = W x + b`` with ``W`` of shape ``(out, in)`` and per-token output gradient
``g = d(sum of token losses)/dy``, accumulated over T calibration tokens:

* ``A = (1/T) sum x x^T``  ``(in, in)``: input covariance (K-FAC's activation factor);
* ``G = (1/T) sum g g^T``  ``(out, out)``: output-gradient covariance (K-FAC's gradient factor);
* ``grad = (1/T) sum g x^T``  ``(out, in)``: the gradient of the *mean* token loss w.r.t. ``W``.

With these, K-FAC approximates the Hessian (Fisher) of the mean loss as ``A ⊗ G``, so a weight
perturbation ``δ`` gives ``H vec(δ) ≈ vec(G δ A)``. Statistics are kept in the ``(out, in)``
convention whatever the storage (GPT-2's Conv1D stores ``[in, out]``, but its forward input and
output are the same as a linear's, which is all the hooks see). Accumulation dtype is the caller's
(``backward_sweep``'s default fp64); GradOT accumulates in fp32, measured to give its terms within
5e-7 of fp64's over 65k tokens of the reference model (``bench/stats_precision.py``).

Memory per decoder layer while its statistics are gathered, in accumulator entries (x 8 bytes in
fp64, x 4 in fp32): one ``in²`` covariance per *distinct* input (q/k/v share one, gate/up share one),
``out²`` per linear for G, and ``out·in`` per linear for the mean gradient only when asked for
(``with_grad``). For a Llama layer (hidden h, key/value width h_kv, MLP width f), without the
gradient::

    A: 3h² + f²  (attention input, o input, MLP input, down input)
    G: 3h² + 2h_kv² + 2f²
    total 6h² + 2h_kv² + 3f²   (Llama-2-7B: 4.0 GB fp64, 2.0 GB fp32)

against 6.0 GB for Llama-2-7B with one covariance per linear (A: 6h² + f²) and every gradient
(2h² + 2h·h_kv + 3hf). ``finalize`` divides in place, so the peak is the accumulators themselves.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from ..core.errors import OffsiteError

STATS_DTYPES = {"float64": torch.float64, "float32": torch.float32}


class DampingWarning(UserWarning):
    """A factorisation needed (more) damping than requested to succeed."""


class _Covariance:
    """Running ``sum x x^T`` of one distinct linear input, shared by every linear that reads it."""

    def __init__(self, features: int, dtype, device, owner: str):
        self.sum = torch.zeros(features, features, dtype=dtype, device=device)
        self.owner, self.tokens, self.mean = owner, 0, None

    def finalize(self) -> torch.Tensor:
        if self.mean is None:  # divided in place, once, whichever reader asks first: no copy
            self.mean = self.sum.div_(float(self.tokens))
        return self.mean


class LinearStats:
    """Running K-FAC factors and mean weight gradient of one linear (add batches, then finalize).

    ``covariance`` (the A factor) may be shared with other linears of the same input (q/k/v, gate/up);
    only its ``owner`` role adds to it. ``with_grad=False`` skips the mean gradient (an ``(out, in)``
    accumulator) for consumers that do not use it.
    """

    def __init__(self, in_features: int, out_features: int, dtype=torch.float64, device=None,
                 covariance: _Covariance | None = None, role: str = "", with_grad: bool = True):
        self.role = role
        self.cov = covariance or _Covariance(in_features, dtype, device, role)
        self.G = torch.zeros(out_features, out_features, dtype=dtype, device=device)
        self.grad = torch.zeros(out_features, in_features, dtype=dtype, device=device) if with_grad else None
        self.tokens = 0

    @property
    def A(self) -> torch.Tensor:
        return self.cov.sum

    def update(self, x: torch.Tensor, g: torch.Tensor) -> None:
        """Add tokens.

        Args:
            x: inputs ``(..., in)``.
            g: gradients of the summed token loss w.r.t. the outputs, ``(..., out)``.
        """
        x = x.detach().reshape(-1, self.A.shape[0]).to(self.G.dtype)
        g = g.detach().reshape(-1, self.G.shape[0]).to(self.G.dtype)
        if self.cov.owner == self.role:
            self.cov.sum.addmm_(x.T, x)
            self.cov.tokens += x.shape[0]
        self.G.addmm_(g.T, g)
        if self.grad is not None:
            self.grad.addmm_(g.T, x)
        self.tokens += x.shape[0]

    def finalize(self) -> dict:
        """``{"A": (in, in), "G": (out, out), "grad": (out, in) or None, "tokens": T}`` as means over tokens.

        The accumulators are divided in place (no copies); the object is spent afterwards.
        """
        if self.tokens == 0:
            raise OffsiteError("no calibration tokens reached this linear; check the calibration batches")
        t = float(self.tokens)
        return {"A": self.cov.finalize(), "G": self.G.div_(t), "grad": None if self.grad is None else self.grad.div_(t),
                "tokens": self.tokens}


@contextlib.contextmanager
def gather_linear_stats(linears: dict, dtype=torch.float64, with_grad: bool = True):
    """Hook ``{role: module}`` so every forward + backward through them adds to a :class:`LinearStats`.

    The forward hook keeps the module's input and registers a hook on its output tensor that
    receives the output gradient during ``backward``; both are dropped right after use, so only
    one layer's activations live at a time. Linears fed the very same input tensor (q/k/v, gate/up:
    seen on the first batch) share one input covariance. Hooks are removed on exit, also on error.

    Args:
        with_grad: also accumulate each linear's mean weight gradient.

    Yields:
        ``{role: LinearStats}``, filled as backward passes run.
    """
    stats, handles, seen = {}, [], {}

    def hook_for(role):
        def forward_hook(module, inputs, output):
            x = inputs[0]
            if not output.requires_grad:
                return
            entry = stats.get(role)
            if entry is None:
                # same storage, shape and strides = the same input: share its covariance
                key = (x.data_ptr(), tuple(x.shape), x.stride())
                shared = seen.get(key)
                entry = stats[role] = LinearStats(x.shape[-1], output.shape[-1], dtype, x.device, shared, role,
                                                  with_grad)
                seen.setdefault(key, entry.cov)
            output.register_hook(lambda g, x=x.detach(), entry=entry: entry.update(x, g))
        return forward_hook

    try:
        for role, module in linears.items():
            handles.append(module.register_forward_hook(hook_for(role)))
        yield stats
    finally:
        for h in handles:
            h.remove()


def damped_cholesky(matrix: torch.Tensor, damping: float = 0.0, name: str = "matrix", max_tries: int = 8):
    """Cholesky factor of ``matrix + d * mean(diag) * I``, raising ``d`` tenfold until it succeeds.

    Args:
        matrix: symmetric positive semi-definite ``(n, n)``.
        damping: relative damping to start with (0 = try undamped first).
        name: what the matrix is, for the warning.
        max_tries: attempts before giving up.

    Returns:
        ``(L, used)``: lower-triangular ``L`` with ``L L^T = matrix + used * mean(diag) * I``.

    Warns:
        DampingWarning: when more damping than ``damping`` was needed (says how much).
    """
    scale = matrix.diagonal().abs().mean().clamp_min(torch.finfo(matrix.dtype).tiny)
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    used = float(damping)
    for _ in range(max_tries):
        factor, info = torch.linalg.cholesky_ex(matrix + used * scale * eye)
        if int(info) == 0:
            if used > damping:
                warnings.warn(f"{name}: not positive definite; damped with {used:.1e} x mean diagonal "
                              f"(requested {damping:.1e})", DampingWarning, stacklevel=2)
            return factor, used
        used = max(used * 10.0, 1e-8)
    raise OffsiteError(f"{name}: Cholesky failed even with damping {used / 10:.1e} x mean diagonal; "
                       "the calibration statistics are degenerate (too few tokens?)")


def damped_inverse(matrix: torch.Tensor, damping: float = 0.0, name: str = "matrix") -> torch.Tensor:
    """Inverse of ``matrix + d * mean(diag) * I`` via :func:`damped_cholesky` (warns when damping triggers)."""
    factor, _ = damped_cholesky(matrix, damping, name)
    return torch.cholesky_inverse(factor)
