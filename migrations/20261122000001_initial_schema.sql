-- loraloop's whole domain. STRICT tables, named constraints, timestamps as RFC 3339 text (UTC).
-- Never edit this file once it has shipped: add a new migration.

create table adapters (
    id                  integer primary key,
    name                text not null,
    path                text not null,
    base_model          text not null,
    base_model_hash     text not null,
    tokenizer_hash      text not null,
    chat_template_hash  text not null,
    method              text not null default 'lora',
    rank                integer,
    alpha               real,
    target_modules      text not null default '[]',
    metrics             text not null default '{}',
    job_id              integer,   -- the training job that made it (null when uploaded)
    created_at          text not null default (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    constraint adapters_name_unique unique (name),
    constraint adapters_method_check check (method in ('lora', 'full', 'freeze')),
    constraint adapters_target_modules_json check (json_valid(target_modules)),
    constraint adapters_metrics_json check (json_valid(metrics)),
    constraint adapters_job_fk foreign key (job_id) references training_jobs (id) on delete set null
) strict;

create table assistants (
    id                  integer primary key,
    name                text not null,
    base_model          text not null,
    system_prompt       text not null default '',
    generation          text not null default '{}',   -- sampling settings as JSON
    active_adapter_id   integer,
    created_at          text not null default (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at          text not null default (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    constraint assistants_name_unique unique (name),
    constraint assistants_generation_json check (json_valid(generation)),
    constraint assistants_active_adapter_fk foreign key (active_adapter_id) references adapters (id) on delete set null
) strict;

-- Every activation and rollback, newest last: the history a one-click rollback walks back.
create table adapter_activations (
    id              integer primary key,
    assistant_id    integer not null,
    adapter_id      integer,           -- null: back to the base model
    activated_by    text not null,
    created_at      text not null default (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    constraint adapter_activations_assistant_fk foreign key (assistant_id) references assistants (id) on delete cascade,
    constraint adapter_activations_adapter_fk foreign key (adapter_id) references adapters (id) on delete set null
) strict;

create table platform_users (
    id                      integer primary key,
    platform                text not null,
    platform_user_id        text not null,
    username                text,
    display_name            text,
    -- set by /forget: the user's messages are deleted and nothing of theirs enters a dataset
    excluded_from_training  integer not null default 0,
    forgotten_at            text,
    created_at              text not null default (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    constraint platform_users_platform_check check (platform in ('telegram', 'discord', 'web', 'cli', 'api')),
    constraint platform_users_unique unique (platform, platform_user_id),
    constraint platform_users_excluded_bool check (excluded_from_training in (0, 1))
) strict;

create table chats (
    id                  integer primary key,
    platform            text not null,
    platform_chat_id    text not null,
    kind                text not null default 'private',
    title               text,
    created_at          text not null default (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    constraint chats_platform_check check (platform in ('telegram', 'discord', 'web', 'cli', 'api')),
    constraint chats_kind_check check (kind in ('private', 'group', 'channel', 'thread')),
    constraint chats_unique unique (platform, platform_chat_id)
) strict;

create table conversations (
    id                      integer primary key,
    assistant_id            integer not null,
    chat_id                 integer,
    user_id                 integer,            -- who started it (private chats: the only user)
    platform_thread_id      text,               -- group topic / Discord thread
    excluded_from_training  integer not null default 0,
    closed_at               text,               -- set by /reset; a new conversation starts
    created_at              text not null default (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    constraint conversations_assistant_fk foreign key (assistant_id) references assistants (id) on delete restrict,
    constraint conversations_chat_fk foreign key (chat_id) references chats (id) on delete cascade,
    constraint conversations_user_fk foreign key (user_id) references platform_users (id) on delete set null,
    constraint conversations_excluded_bool check (excluded_from_training in (0, 1))
) strict;

create index conversations_chat_idx on conversations (chat_id, platform_thread_id, closed_at);

create table messages (
    id                  integer primary key,
    conversation_id     integer not null,
    role                text not null,
    content             text not null,
    user_id             integer,            -- author of a user message
    platform_message_id text,               -- the platform's id (for a streamed reply: its first part)
    adapter_id          integer,            -- the adapter that produced an assistant message
    adapter_name        text,               -- kept when the adapter row is deleted
    prompt_tokens       integer,
    completion_tokens   integer,
    created_at          text not null default (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at          text not null default (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    constraint messages_role_check check (role in ('system', 'user', 'assistant')),
    constraint messages_conversation_fk foreign key (conversation_id) references conversations (id) on delete cascade,
    constraint messages_user_fk foreign key (user_id) references platform_users (id) on delete set null,
    constraint messages_adapter_fk foreign key (adapter_id) references adapters (id) on delete set null
) strict;

create index messages_conversation_idx on messages (conversation_id, id);
-- A platform message is stored once per conversation and role, even when the update is redelivered.
create unique index messages_platform_id_unique on messages (conversation_id, role, platform_message_id)
    where platform_message_id is not null;

-- Platform updates already handled (Telegram update_id, Discord message id): nothing twice.
create table inbound_updates (
    platform        text not null,
    update_key      text not null,
    created_at      text not null default (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    constraint inbound_updates_pk primary key (platform, update_key)
) strict, without rowid;

create table feedback (
    id              integer primary key,
    message_id      integer not null,
    rater           text not null,          -- 'telegram:123', 'discord:456', 'operator'
    user_id         integer,
    rating          integer,                -- 1 = thumbs up, -1 = thumbs down
    correction      text,                   -- an operator's better reply: the training target
    created_at      text not null default (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at      text not null default (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    constraint feedback_message_fk foreign key (message_id) references messages (id) on delete cascade,
    constraint feedback_user_fk foreign key (user_id) references platform_users (id) on delete set null,
    constraint feedback_rating_check check (rating is null or rating in (-1, 1)),
    constraint feedback_not_empty check (rating is not null or correction is not null),
    constraint feedback_one_per_rater unique (message_id, rater)
) strict;

create table datasets (
    id              integer primary key,
    name            text not null,
    version         integer not null,
    content_hash    text not null,          -- sha256 of the canonical OpenAI chat JSONL
    format          text not null,          -- format of the source ('openai', 'alpaca', ... or 'conversations')
    source          text not null,          -- file name or the conversation filter as JSON
    example_count   integer not null,
    created_at      text not null default (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    constraint datasets_name_version_unique unique (name, version),
    constraint datasets_name_hash_unique unique (name, content_hash),
    constraint datasets_version_positive check (version >= 1),
    constraint datasets_name_check check (length(name) between 1 and 100)
) strict;

create table dataset_examples (
    id                      integer primary key,
    dataset_id              integer not null,
    position                integer not null,
    messages                text not null,      -- the example as one canonical JSON line
    char_count              integer not null,
    token_count             integer,
    source_conversation_id  integer,
    constraint dataset_examples_dataset_fk foreign key (dataset_id) references datasets (id) on delete cascade,
    constraint dataset_examples_conversation_fk foreign key (source_conversation_id) references conversations (id) on delete set null,
    constraint dataset_examples_position_unique unique (dataset_id, position),
    constraint dataset_examples_json check (json_valid(messages))
) strict;

-- Datasets are immutable snapshots: a training job's data never changes under it.
-- (Deleting a whole dataset is allowed; the source_conversation_id link may be cleared.)
create trigger datasets_immutable before update on datasets
begin
    select raise(abort, 'datasets are immutable: create a new version');
end;

create trigger dataset_examples_immutable before update of dataset_id, position, messages, char_count on dataset_examples
begin
    select raise(abort, 'dataset examples are immutable: create a new version');
end;

create table training_jobs (
    id                  integer primary key,
    state               text not null default 'validating_files',
    dataset_id          integer not null,
    base_model          text not null,
    base_model_hash     text,
    method              text not null default 'lora',
    hyperparameters     text not null default '{}',
    output_dir          text,
    adapter_id          integer,
    step                integer not null default 0,
    total_steps         integer,
    cancel_requested    integer not null default 0,
    error               text,
    created_at          text not null default (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    started_at          text,
    finished_at         text,
    constraint training_jobs_state_check check (state in ('validating_files', 'queued', 'running', 'succeeded', 'failed', 'cancelled')),
    constraint training_jobs_method_check check (method in ('lora', 'full', 'freeze')),
    constraint training_jobs_hyperparameters_json check (json_valid(hyperparameters)),
    constraint training_jobs_dataset_fk foreign key (dataset_id) references datasets (id) on delete restrict,
    constraint training_jobs_adapter_fk foreign key (adapter_id) references adapters (id) on delete set null
) strict;

create index training_jobs_state_idx on training_jobs (state, id);

create table training_events (
    id              integer primary key,
    job_id          integer not null,
    kind            text not null,          -- 'step', 'eval', 'log', 'state'
    step            integer,
    loss            real,
    eval_loss       real,
    learning_rate   real,
    tokens_per_sec  real,
    message         text,
    created_at      text not null default (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    constraint training_events_kind_check check (kind in ('step', 'eval', 'log', 'state')),
    constraint training_events_job_fk foreign key (job_id) references training_jobs (id) on delete cascade
) strict;

create index training_events_job_idx on training_events (job_id, id);

-- Console login: only the password's hash is stored.
create table admin_credentials (
    id              integer primary key,
    username        text not null,
    password_hash   text not null,
    created_at      text not null default (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    constraint admin_credentials_username_unique unique (username)
) strict;

create table web_sessions (
    token_hash      text primary key,       -- sha256 of the cookie value
    admin_id        integer not null,
    csrf_token      text not null,
    created_at      text not null default (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    expires_at      text not null,
    constraint web_sessions_admin_fk foreign key (admin_id) references admin_credentials (id) on delete cascade
) strict, without rowid;
