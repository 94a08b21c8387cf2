"""Typed errors. Every failure caused by the user's input or set-up is a MedlensError (CLI exit code 2)."""

from __future__ import annotations


class MedlensError(Exception):
    """Base class: a problem with the input, the options or the environment, not a bug."""

    def __init__(self, reason: str, path: str | None = None) -> None:
        self.reason = reason
        self.path = path
        super().__init__(f"{path}: {reason}" if path else reason)


class UnknownNameError(MedlensError):
    """A recipe, backend, model or other registered name does not exist."""


class InputError(MedlensError):
    """The input files cannot be turned into images for the model."""


class NotFoundError(InputError):
    """The path does not exist."""


class UnsupportedInputError(InputError):
    """The file is not of a kind medlens reads (or not what its name says)."""


class CorruptFileError(InputError):
    """The file is of a known kind but damaged: truncated, undecodable pixels, bad header."""


class NoImageDataError(InputError):
    """The object carries no pixels a model can look at (SR, SEG, RTDOSE, presentation state ...)."""


class NoImagesFoundError(InputError):
    """A folder or archive holds nothing readable."""


class ImageTooSmallError(InputError):
    """The image is too small to mean anything to the model (for example 1x1)."""


class TooLargeError(InputError):
    """Decoding would exceed the memory budget; checked from the header before decoding."""


class InconsistentSeriesError(InputError):
    """A series cannot be one volume: mixed orientations, uneven spacing, duplicate or odd-sized slices."""


class SeriesSelectionError(InputError):
    """The requested series is not in the input, or several studies make the choice ambiguous."""


class OutputFolderError(InputError):
    """An output folder cannot be written: it holds someone else's files, or an earlier result not to be
    replaced without --overwrite."""


class ModelNotAvailableError(MedlensError):
    """The model is neither a built-in, a local directory, nor in the local Hugging Face cache."""


class BackendUnavailableError(MedlensError):
    """The libraries a backend needs are not installed."""
