"""Which decoder layers are the adapter (trainable, shipped whole) and which form the middle.

OT's default is the first 2 and last 2 layers ("2,2"); CRaSh places adapter layers anywhere, so an
explicit index list is accepted too. All indices are *full-model* layer numbers.
"""

from __future__ import annotations

import dataclasses

from ..core.errors import OffsiteError


@dataclasses.dataclass(frozen=True)
class Split:
    """Adapter/middle partition of a model with ``num_layers`` decoder layers.

    Attributes:
        num_layers: decoder layers in the full model.
        adapter: sorted full-model indices of the adapter layers.
    """

    num_layers: int
    adapter: tuple

    @property
    def middle(self) -> tuple:
        """Sorted full-model indices of the non-adapter layers (what an emulator compresses)."""
        chosen = set(self.adapter)
        return tuple(i for i in range(self.num_layers) if i not in chosen)

    def to_dict(self) -> dict:
        return {"num_layers": self.num_layers, "adapter": list(self.adapter), "middle": list(self.middle)}

    @classmethod
    def from_dict(cls, data: dict) -> "Split":
        return make_split(data["num_layers"], list(data["adapter"]))


def parse_adapter_layers(spec) -> tuple:
    """Parse ``--adapter-layers``: ``"a,b"`` (first a, last b) or ``"idx:0,5,18,23"`` / a list.

    Returns:
        ``("ends", (a, b))`` or ``("indices", (i, j, ...))``.
    """
    if isinstance(spec, (list, tuple)):
        return ("indices", tuple(int(i) for i in spec))
    text = str(spec).strip()
    if text == "all":
        return ("all", ())
    try:
        if text.startswith(("idx:", "indices:")):
            return ("indices", tuple(int(x) for x in text.split(":", 1)[1].split(",") if x.strip()))
        parts = [int(x) for x in text.split(",")]
    except ValueError:
        raise OffsiteError(
            f"cannot parse adapter layers {spec!r}; use 'a,b' (first a and last b layers, e.g. '2,2') "
            "or 'idx:0,5,18,23' (explicit full-model indices)"
        ) from None
    if len(parts) != 2:
        raise OffsiteError(
            f"adapter layers {spec!r} must be 'a,b' (two numbers: first a and last b layers) "
            "or 'idx:i,j,...' for an explicit list"
        )
    return ("ends", (parts[0], parts[1]))


def make_split(num_layers: int, spec="2,2") -> Split:
    """Build and validate a :class:`Split` for a model with ``num_layers`` decoder layers.

    Args:
        num_layers: decoder layers of the full model.
        spec: ``"a,b"``, ``(a, b)`` via ``"a,b"``, ``"idx:..."`` or an explicit list of indices;
            ``"all"`` (or every index) makes every layer trainable with an empty middle, which is
            the full fine-tuning baseline, not an offsite-tuning setting.

    Raises:
        OffsiteError: with the allowed range when the request does not fit the model.
    """
    if num_layers < 2:
        raise OffsiteError(f"the model has {num_layers} decoder layer(s); offsite-tuning needs at least 2")
    kind, values = parse_adapter_layers(spec) if not isinstance(spec, Split) else ("indices", spec.adapter)
    if kind == "all" or (kind == "indices" and sorted(values) == list(range(num_layers))):
        # Every layer trainable, nothing emulated: only meaningful as the full fine-tuning upper
        # bound of a report, never as something to ship (it would hand over the whole model).
        return Split(num_layers=num_layers, adapter=tuple(range(num_layers)))
    if kind == "ends":
        a, b = values
        if a < 0 or b < 0:
            raise OffsiteError(f"adapter layers a={a}, b={b} must be >= 0")
        if a + b == 0:
            raise OffsiteError("adapter layers 0,0 leave nothing to fine-tune; use at least one (e.g. 2,2)")
        if a + b >= num_layers:
            raise OffsiteError(
                f"adapter layers {a}+{b}={a + b} leave no middle layer in a {num_layers}-layer model; "
                f"a+b must be at most {num_layers - 1}"
            )
        adapter = tuple(range(a)) + tuple(range(num_layers - b, num_layers))
    else:
        adapter = values
        bad = [i for i in adapter if not 0 <= i < num_layers]
        if bad:
            raise OffsiteError(f"adapter layer indices {bad} are outside 0..{num_layers - 1} ({num_layers} layers)")
        if len(set(adapter)) != len(adapter):
            raise OffsiteError(f"adapter layer indices {list(adapter)} contain duplicates")
        if not adapter:
            raise OffsiteError("the adapter layer list is empty; give at least one index")
    return Split(num_layers=num_layers, adapter=tuple(sorted(adapter)))
