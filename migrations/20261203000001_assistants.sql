-- Several assistants on one base model. Each has its own activation policy (null: the
-- config's `assistant.activation`), and its own datasets, jobs and adapters: the
-- assistant_id columns below (null on a dataset or an uploaded adapter: not tied to one
-- assistant, usable by any).
alter table assistants add column activation text
    constraint assistants_activation_check check (activation is null or activation in ('manual', 'gate', 'canary'));

alter table datasets add column assistant_id integer
    constraint datasets_assistant_fk references assistants (id) on delete set null;
alter table training_jobs add column assistant_id integer
    constraint training_jobs_assistant_fk references assistants (id) on delete set null;
alter table adapters add column assistant_id integer
    constraint adapters_assistant_fk references assistants (id) on delete set null;

-- Jobs and trained adapters made before there were several assistants were for the one
-- there was.
update training_jobs set assistant_id = (select min(id) from assistants);
update adapters set assistant_id = (select min(id) from assistants) where job_id is not null;

-- Which assistant answers where: a Telegram bot (its numeric id, the token's part before
-- the colon; never the token) or chat, a Discord application, guild or channel. The most
-- specific route wins (chat/channel, then guild, then bot/application); no route: the
-- default assistant (the config's `assistant.name`).
create table assistant_routes (
    id              integer primary key,
    assistant_id    integer not null,
    platform        text not null,
    scope           text not null,
    key             text not null,
    created_at      text not null default (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    constraint assistant_routes_assistant_fk foreign key (assistant_id) references assistants (id) on delete cascade,
    constraint assistant_routes_scope_check check (
        (platform = 'telegram' and scope in ('bot', 'chat'))
        or (platform = 'discord' and scope in ('application', 'guild', 'channel'))),
    constraint assistant_routes_key_check check (length(key) between 1 and 64),
    constraint assistant_routes_unique unique (platform, scope, key)
) strict;

create index assistant_routes_assistant_idx on assistant_routes (assistant_id);
