"""Errors a user can act on. Each carries one clear message; the CLI prints it without a traceback."""


class MammoError(Exception):
    """Base class: a problem with the user's input or data, with a message that says what to do."""


class DicomReadError(MammoError):
    """A file that cannot be read as a usable mammogram (the message says why)."""


class CatalogError(MammoError):
    """Something asked of the catalog that does not exist or would break it."""


class ModelError(MammoError):
    """A checkpoint or layer that cannot be loaded or used."""


class QueryError(MammoError):
    """An ROI query that cannot be answered (empty ROI, ROI outside the patch, unknown unit...)."""


class ConceptError(MammoError):
    """A concept-store request that is invalid (empty name, unknown unit or run...)."""
