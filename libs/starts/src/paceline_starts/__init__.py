"""How instances start (shared by the admin API and the scheduler; no service imports another).

- `instances`: a PENDING instance with its root span and its start command in the outbox.
- `schedule_store` / `firing`: schedules, their fire ledger, and what a fire writes.
- `intake`: an event, its deduplications and the instances its subscribers start.

Every start is one transaction: the rows that say why it started (a ledger row, an event) are
committed with the instance and its start command, or not at all.
"""
