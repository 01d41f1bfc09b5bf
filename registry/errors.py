"""Registry errors a user can cause; all are MergeyardError, printed on one line by the CLI."""

from merging.errors import MergeyardError


class RegistryError(MergeyardError):
    """The lineage database or the store cannot do what was asked."""


class ModelNotFoundError(RegistryError):
    """No model matches a digest, prefix, name or NAME@ALIAS."""


class AmbiguousModelError(RegistryError):
    """A digest prefix or name matches more than one model."""


class SourceError(MergeyardError):
    """A source URI is malformed, unsupported, or cannot be fetched."""


class ValidationFailed(MergeyardError):
    """A checkpoint failed validation: nothing about it was recorded."""


class AppendOnlyError(RegistryError):
    """An update or delete of an append-only record (promotion events) was attempted."""


class SchemaOutOfDateError(RegistryError):
    """The database schema is behind this mergeyard: run `mergeyard db upgrade`."""


class MirrorLostError(RegistryError):
    """The MLflow mirror lacks what the lineage database recorded in it: `mergeyard doctor --fix` rebuilds it."""


class StoreDamagedError(RegistryError):
    """A stored copy is missing or its bytes differ from what was recorded."""
