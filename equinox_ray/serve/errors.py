"""Errors the controller raises and the ingress maps to HTTP statuses.

They live apart from controller.py on purpose: Serve pickles the controller actor's own module by value, so classes
defined there would not be the same classes the ingress catches."""


class QueueFull(Exception):
    """The user's queue is at its bound; the ingress answers 429."""


class Cancelled(Exception):
    """The request was cancelled while it waited."""


class Busy(Exception):
    """The change needs an idle controller (no request waiting or running)."""
