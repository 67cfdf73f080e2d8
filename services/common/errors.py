"""One small error hierarchy. Each class carries the HTTP status it maps to; the gRPC mapping
lives beside the wire code. Messages name the offending field, value and limit."""


class AlignedServeError(Exception):
    """Base of every error AlignedServe raises on purpose."""

    http_status = 500


class InvalidRequestError(AlignedServeError):
    """The caller sent something we cannot serve (bad field, prompt too long, ...)."""

    http_status = 400

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ConfigError(AlignedServeError, ValueError):
    """A configuration value is out of range or inconsistent."""


class ModelLoadError(AlignedServeError):
    """A model directory is unusable: missing files, unknown architecture, bad tensors."""


class OutOfBlocksError(AlignedServeError):
    """A KV block pool has fewer free blocks than asked for."""

    http_status = 503


class UnavailableError(AlignedServeError):
    """Not serving right now (draining, or no worker within the recovery deadline)."""

    http_status = 503


class QueueFullError(AlignedServeError):
    """Admission queue or KV pool is full: retry later (HTTP 429 with Retry-After)."""

    http_status = 429
