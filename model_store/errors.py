"""Errors of the model store; the service maps them to gRPC status codes."""


class StoreError(Exception):
    """Base class of every model store error."""


class InvalidTagError(StoreError, ValueError):
    """A tag, name or version that does not match the tag grammar."""


class ModelNotFoundError(StoreError, LookupError):
    """No stored model matches the tag."""


class ModelExistsError(StoreError):
    """The tag being written already exists."""


class InvalidSignatureError(StoreError, ValueError):
    """A declared signature is malformed or names a method the pipeline lacks."""


class IntegrityError(StoreError):
    """Stored files do not match the checksums recorded in model.yaml."""


class UntrustedCodeError(StoreError):
    """A model ships custom pipeline code and the operator has not said to trust it."""
