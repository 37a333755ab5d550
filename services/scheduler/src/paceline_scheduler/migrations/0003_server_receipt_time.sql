-- LOST must not depend on the clocks of other hosts: last_heartbeat becomes the database's
-- time of receipt, and reported_at (the server's own clock) only orders its heartbeats.
ALTER TABLE servers ADD COLUMN reported_at timestamptz;
UPDATE servers SET reported_at = last_heartbeat;
ALTER TABLE servers ALTER COLUMN reported_at SET NOT NULL;
