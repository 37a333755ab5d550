"""Claims: request/reply over RabbitMQ to the scheduler, which records who holds an attempt.

A non-restartable activity, and any redelivered one, runs only after the scheduler granted
its claim; the reply says which attempt to run under. A first delivery of a restartable
activity only sends a notice (confirmed by the broker, not answered by the scheduler), so the
scheduler knows which server held it if that server dies.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from pydantic import ValidationError

from paceline_contracts.messages import CLAIM_REPLY, ActivityTask, ClaimAttempt, ClaimReply
from paceline_contracts.queues import Queue, reply_queue_name
from paceline_infra import telemetry
from paceline_infra.amqp import Outgoing, Publisher

log = logging.getLogger(__name__)


class Claimer:
    def __init__(self, server_id: str, publisher: Publisher, *, reply_timeout_s: float = 10.0):
        self._server_id = server_id
        self._publisher = publisher
        self._reply_timeout_s = reply_timeout_s
        self._waiting: dict[str, asyncio.Future[ClaimReply]] = {}
        self._reply_to = ""

    async def open(self, connection: AbstractRobustConnection, namespace: str) -> None:
        channel = await connection.channel()
        self._reply_to = reply_queue_name(namespace, self._server_id)
        # Exclusive: it lives and dies with this worker's connection (and is declared again
        # by the robust connection after a reconnect).
        queue = await channel.declare_queue(self._reply_to, exclusive=True, auto_delete=True)
        await queue.consume(self._on_reply, no_ack=True)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._waiting.pop(message.correlation_id or "", None)
        if future is None or future.done():
            return  # the answer to a question asked again since, or from before a restart
        try:
            future.set_result(CLAIM_REPLY.validate_json(message.body))
        except ValidationError as exc:
            future.set_exception(exc)

    async def claim(
        self, task: ActivityTask, *, redelivered: bool, delivery_count: int
    ) -> ClaimReply:
        """Ask until the scheduler answers. A claim is idempotent for this server, so asking
        again after a lost reply is safe."""
        delay = 1.0
        while True:
            correlation_id = uuid.uuid4().hex
            future: asyncio.Future[ClaimReply] = asyncio.get_running_loop().create_future()
            self._waiting[correlation_id] = future
            try:
                await self._publisher.publish(
                    self._message(
                        task,
                        redelivered,
                        delivery_count,
                        wants_reply=True,
                        correlation_id=correlation_id,
                    )
                )
                return await asyncio.wait_for(future, self._reply_timeout_s)
            except (TimeoutError, ValidationError) as exc:
                log.warning(
                    "claim of %s/%s attempt %d unanswered (%s); asking again",
                    task.instance_id,
                    task.step,
                    task.attempt,
                    type(exc).__name__,
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("claim publish failed (%s); retrying in %.0fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            finally:
                self._waiting.pop(correlation_id, None)

    async def notify(self, task: ActivityTask) -> None:
        """Tell the scheduler this server started a restartable attempt; no answer needed."""
        try:
            await self._publisher.publish(self._message(task, False, 0, wants_reply=False))
        except Exception as exc:
            log.info("start notice for %s/%s not sent: %s", task.instance_id, task.step, exc)

    def _message(
        self,
        task: ActivityTask,
        redelivered: bool,
        delivery_count: int,
        *,
        wants_reply: bool,
        correlation_id: str | None = None,
    ) -> Outgoing:
        claim = ClaimAttempt(
            instance_id=task.instance_id,
            step=task.step,
            attempt=task.attempt,
            server_id=self._server_id,
            at=datetime.now(UTC),
            redelivered=redelivered,
            delivery_count=delivery_count,
            wants_reply=wants_reply,
        )
        message_id = uuid.uuid4().hex
        return Outgoing(
            Queue.CLAIMS,
            claim.model_dump_json().encode(),
            claim.type,
            message_id,
            telemetry.produced(
                Queue.CLAIMS.value,
                message_id,
                conversation_id=correlation_id,
                attributes={
                    "paceline.instance_id": str(task.instance_id),
                    "paceline.step": task.step,
                    "paceline.attempt": task.attempt,
                    "paceline.server": self._server_id,
                },
            ),
            reply_to=self._reply_to if wants_reply else None,
            correlation_id=correlation_id,
        )
