"""Every error the runtime raises, in one place (the gateway maps them to HTTP statuses).

Also importable from where they are raised: runtime.actor and runtime.supervision.
"""


class ActorError(Exception):
    """Base class of the errors raised by the runtime."""


class MailboxFull(ActorError):
    """The bounded mailbox is full. Raised at once so callers can shed load (HTTP 429)."""


class ActorStopped(ActorError):
    """The actor is stopping or gone, or went away before it got to the message."""


class AskTimeout(ActorError, TimeoutError):
    """ask() got no reply within its timeout."""


class Escalation(ActorError):
    """A supervisor gave up: a child failed to start or crashed too often.

    The message names the child and its error; ``__cause__`` is that error.
    """
