-- Canary releases: a new adapter serves a share of new conversations until the 👍 rates
-- of its replies and of the current adapter's decide (promoted) or rule it out (rolled_back).
-- At most one canary runs per assistant (ended_at is null).
create table canaries (
    id                  integer primary key,
    assistant_id        integer not null,
    adapter_id          integer not null,   -- the candidate
    baseline_adapter_id integer,            -- what users had when it started (null: the base model)
    share               real not null,
    started_at          text not null default (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    ended_at            text,
    outcome             text,
    reason              text,
    constraint canaries_assistant_fk foreign key (assistant_id) references assistants (id) on delete cascade,
    constraint canaries_adapter_fk foreign key (adapter_id) references adapters (id) on delete cascade,
    constraint canaries_baseline_fk foreign key (baseline_adapter_id) references adapters (id) on delete set null,
    constraint canaries_share_check check (share > 0 and share < 1),
    constraint canaries_outcome_check check (outcome is null or outcome in ('promoted', 'rolled_back', 'cancelled')),
    constraint canaries_ended_check check ((ended_at is null) = (outcome is null))
) strict;

create unique index canaries_one_running on canaries (assistant_id) where ended_at is null;

-- The adapter a conversation is served by until it has been idle for assistant.pin_idle_minutes
-- (pinned_at null: not pinned; pinned_adapter_id null with pinned_at set: the base model).
-- No foreign key: a pin to a deleted adapter is noticed and replaced at the next turn.
alter table conversations add column pinned_adapter_id integer;
alter table conversations add column pinned_at text;

-- Set when an operator or a canary rolls the adapter back: pins to it end at the next turn.
-- Cleared when it is activated again.
alter table adapters add column rolled_back_at text;

-- A rollback row undoes the activation row it names, so rollbacks walk the history back
-- (each one a step further) instead of toggling between the last two.
alter table adapter_activations add column rollback_of integer;

-- The canary's rating counts read replies by adapter and time.
create index messages_adapter_idx on messages (adapter_id, created_at);
