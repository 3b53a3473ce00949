-- Platform updates are stored before they are confirmed to the platform and processed
-- from the database, so a crash loses nothing: the payload, whether its reply was sent,
-- and why it failed if it did.
alter table inbound_updates add column payload text;
alter table inbound_updates add column status text not null default 'done'
    constraint inbound_updates_status_check check (status in ('pending', 'done', 'failed'));
alter table inbound_updates add column error text;
alter table inbound_updates add column done_at text;

create index inbound_updates_pending_idx on inbound_updates (platform, status);
