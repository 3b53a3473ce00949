-- The platform message a reply is being streamed into, recorded when it is created: a
-- replay after a crash finishes that message instead of sending a second one.
alter table inbound_updates add column reply_platform_id text;
-- A reply that failed for a passing reason (the platform or the network down) is tried
-- again after `retry_at`, `attempts` times so far.
alter table inbound_updates add column attempts integer not null default 0;
alter table inbound_updates add column retry_at text;
