"""greenroom's actor kernel: actors, supervision, the actor system. Knows nothing of MLX or HTTP."""

from runtime.actor import Actor, ActorError, ActorStopped, AskTimeout, MailboxFull
from runtime.supervision import (
    ActorRef,
    ChildSpec,
    Escalation,
    Restart,
    RestartIntensity,
    Strategy,
    Supervisor,
)
from runtime.system import ActorSystem

__all__ = [
    "Actor",
    "ActorError",
    "ActorRef",
    "ActorStopped",
    "ActorSystem",
    "AskTimeout",
    "ChildSpec",
    "Escalation",
    "MailboxFull",
    "Restart",
    "RestartIntensity",
    "Strategy",
    "Supervisor",
]
