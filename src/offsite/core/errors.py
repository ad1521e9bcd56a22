"""One exception type for every refusal offsite makes.

Every bad input (unknown architecture, wrong layer counts, tampered artifact, mismatched adapter,
missing data file) raises :class:`OffsiteError` with a message that says what was wrong and what is
allowed. The CLI prints the message without a traceback and exits with status 2.
"""


class OffsiteError(Exception):
    """A user-facing error: the message alone must tell the user what to fix."""


class ArtifactError(OffsiteError):
    """An artifact folder is incomplete, tampered with, or does not match what it is used with."""
