"""What a build gives an emulator method besides the model, the split and the config.

One :class:`BuildInputs` travels through a build's stages (``plan`` -> ``apply`` -> ``train``, see
:class:`~offsite.emulator.base.EmulatorBuilder`): the raw calibration input and the tokenizer, the
streamed base model when there is one, the calibration batches once they are tokenised, what a
method learned while planning that is not plain data, and which layers the build already applied.
"""

from __future__ import annotations

import dataclasses

from .calibrated import CalibrationSettings, load_calibration


@dataclasses.dataclass
class BuildInputs:
    """The inputs and working state of one emulator build.

    Attributes:
        calibration: public calibration text (a path), None for the default public corpus, or ready
            batches (a list of ``LongTensor (batch, seq)``), for methods that need it.
        tokenizer: the base model's tokenizer (to tokenise the calibration text), or None.
        stream: a :class:`offsite.model.streaming.StreamedModel` whose skeleton is the model being built
            (methods with ``supports_stream``), or None for a model in memory.
        learned: what a method learned while planning that is not plain data and so cannot go into
            the plan (ScaleOT's trained harmonizers, OT-KD's teacher targets), by name; ``apply``
            and ``train`` read it.
        applied: full-model indices of the layers the build already applied one by one while
            planning (layer-wise methods); ``apply`` leaves them as they are.
    """

    calibration: object = None
    tokenizer: object = None
    stream: object = None
    learned: dict = dataclasses.field(default_factory=dict)
    applied: set = dataclasses.field(default_factory=set)
    _batches: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    def batches(self, method: str, settings: CalibrationSettings) -> list:
        """The calibration batches for ``settings``, tokenised on the first call and kept for the next
        ones (planning and training read the same windows; the text is tokenised once).

        Args:
            method: the method asking (named in the errors, and in the default corpus's lookup).
            settings: the method's window settings (:meth:`CalibrationSettings.of` its config).

        Raises:
            OffsiteError: no calibration available, a missing or empty file, or too little text.
        """
        key = (method, settings)
        if key not in self._batches:
            self._batches[key] = load_calibration(self.calibration, self.tokenizer, method, settings)
        return self._batches[key]
