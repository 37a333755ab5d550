"""Queue and exchange names. Every name lives under the namespace so stacks share a broker."""

from enum import StrEnum


class Queue(StrEnum):
    """A work queue: durable, quorum, with its own dead-letter queue `<name>.dead`."""

    ACTIVITIES = "activities"
    """Activity messages from the scheduler to the workers."""
    RESULTS = "results"
    """Activity results from the workers to the scheduler."""
    COMMANDS = "commands"
    """Commands (start, cancel) from the admin API to the scheduler."""
    EVENTS = "events"
    """Instance events from the scheduler to reporting."""
    CLAIMS = "claims"
    """Start claims from the workers to the scheduler; replies go to each worker's own queue."""
    SERVERS = "servers"
    """Heartbeats of every server, recorded by the scheduler in the server registry."""
    SUSPECTS = "suspects"
    """Activity messages of suspects (a worker died while they ran, more than once): each is
    run alone in a runner process of its own, so that a crash is charged to its cause."""
    EVENTS_IN = "events.in"
    """Events from outside (`{type, id?, source?, data?}`, as `POST /v1/events` takes them),
    consumed by the scheduler: each is recorded with the instances it starts."""


class Stream(StrEnum):
    """A RabbitMQ stream: an append-only log every consumer reads in full, kept for a while."""

    CANCELLATIONS = "cancellations"
    """Cancel requests, read by every worker; a worker that starts later replays them."""
    APPROVALS = "approvals"
    """`approval.requested` announcements, for anyone who notifies people (chat, mail):
    read it from where you like; Paceline itself does not consume it."""


Destination = Queue | Stream
"""Where a message is published: routed by the value on the namespace's direct exchange."""


def stream_name(namespace: str, stream: Stream) -> str:
    return f"{namespace}.{stream.value}"


def destination(value: str) -> Destination:
    """The queue or stream a stored routing value names; raises ValueError for neither."""
    try:
        return Queue(value)
    except ValueError:
        return Stream(value)


def exchange_name(namespace: str) -> str:
    """The direct exchange every message is published to, routed by the queue's name."""
    return f"{namespace}.x"


def dead_letter_exchange_name(namespace: str) -> str:
    return f"{namespace}.dlx"


def queue_name(namespace: str, queue: Queue) -> str:
    return f"{namespace}.{queue.value}"


def dead_queue_name(namespace: str, queue: Queue) -> str:
    return f"{namespace}.{queue.value}.dead"


def reply_queue_name(namespace: str, server_id: str) -> str:
    """A worker's own queue for claim replies: exclusive, gone with its connection."""
    return f"{namespace}.reply.{server_id}"


def control_exchange_name(namespace: str) -> str:
    """Control messages (drain) to one server, routed by its server id."""
    return f"{namespace}.control"


def control_queue_name(namespace: str, server_id: str) -> str:
    """A server's own control queue: exclusive, gone with its connection."""
    return f"{namespace}.control.{server_id}"
