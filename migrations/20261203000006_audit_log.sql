-- Who did what to the things users see: activations, rollbacks, deletions, uploads,
-- /forget, assistant changes, jobs, logins. Actors are `console:admin`, `api` (the API
-- key), `telegram:<user row>`, `discord:<user row>`, `worker` (the gate), `canary`.
create table audit_log (
    id      integer primary key,
    at      text not null default (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    actor   text not null,
    action  text not null,
    target  text,
    details text
) strict;

create index audit_log_at on audit_log (at);
