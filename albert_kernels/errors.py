"""Exceptions raised by albert_kernels."""


class BackendUnavailable(RuntimeError):
    """A kernel backend was asked for but cannot run here; the message says why."""
