"""Errors the controller raises and the ingress maps to HTTP statuses."""


class QueueFull(Exception):
    """The user's queue is at its bound; the ingress answers 429."""


class Cancelled(Exception):
    """The request was cancelled while it waited."""


class Busy(Exception):
    """The change needs an idle controller (no request waiting or running)."""
