"""The one way sealbox.trust says no: a model refused, naming the file and the check."""
from __future__ import annotations


class VerificationError(Exception):
    """A model refused. The message names the file and the check that failed."""

    def __init__(self, file: str, check: str, detail: str):
        self.file, self.check, self.detail = file, check, detail
        super().__init__(f"{file}: {check}: {detail}")
