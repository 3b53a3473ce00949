-- OpenAI's fine-tuning API: uploaded files, and jobs that start from a file. A job created
-- from a file has no dataset until its `validating_files` step has parsed the file, so
-- `training_jobs.dataset_id` becomes nullable. SQLite cannot drop a NOT NULL in place:
-- the table is rebuilt the way SQLite's documentation prescribes (new table, copy, drop,
-- rename). That needs foreign keys off, or dropping the old table would cascade to the
-- jobs' events: `Db::open` migrates on a connection with foreign keys off and checks every
-- link afterwards. The guard below refuses to run otherwise on a database that has jobs.
create temp table migration_guard (foreign_keys_off_or_no_jobs integer check (foreign_keys_off_or_no_jobs = 1));
insert into migration_guard
    select (select foreign_keys from pragma_foreign_keys) = 0 or not exists (select 1 from training_jobs);
drop table migration_guard;

-- Uploaded files (`POST /v1/files`). The bytes live in the database, so a backup holds them.
create table files (
    id          integer primary key,
    filename    text not null,
    purpose     text not null,
    bytes       integer not null,
    content     blob not null,
    created_at  text not null default (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    constraint files_purpose_check check (purpose in ('fine-tune')),
    constraint files_filename_check check (length(filename) between 1 and 255)
) strict;

create table training_jobs_new (
    id                  integer primary key,
    state               text not null default 'validating_files',
    dataset_id          integer,
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
    assistant_id        integer,
    attempts            integer not null default 0,
    lease_until         text,
    -- What an OpenAI-style job was created from, and what its validation made of it.
    training_file_id    integer,
    validation_file_id  integer,
    validation_dataset_id integer,
    -- The file a failed validation refused: 'training_file' or 'validation_file'.
    error_param         text,
    -- Part of the adapter's name (OpenAI's `suffix`).
    suffix              text,
    constraint training_jobs_state_check check (state in ('validating_files', 'queued', 'running', 'succeeded', 'failed', 'cancelled')),
    constraint training_jobs_method_check check (method in ('lora', 'full', 'freeze')),
    constraint training_jobs_hyperparameters_json check (json_valid(hyperparameters)),
    constraint training_jobs_dataset_known check (dataset_id is not null or state in ('validating_files', 'failed', 'cancelled')),
    constraint training_jobs_dataset_fk foreign key (dataset_id) references datasets (id) on delete restrict,
    constraint training_jobs_adapter_fk foreign key (adapter_id) references adapters (id) on delete set null,
    constraint training_jobs_assistant_fk foreign key (assistant_id) references assistants (id) on delete set null,
    constraint training_jobs_training_file_fk foreign key (training_file_id) references files (id) on delete set null,
    constraint training_jobs_validation_file_fk foreign key (validation_file_id) references files (id) on delete set null,
    constraint training_jobs_validation_dataset_fk foreign key (validation_dataset_id) references datasets (id) on delete restrict
) strict;

insert into training_jobs_new (id, state, dataset_id, base_model, base_model_hash, method,
    hyperparameters, output_dir, adapter_id, step, total_steps, cancel_requested, error,
    created_at, started_at, finished_at, assistant_id, attempts, lease_until)
select id, state, dataset_id, base_model, base_model_hash, method,
    hyperparameters, output_dir, adapter_id, step, total_steps, cancel_requested, error,
    created_at, started_at, finished_at, assistant_id, attempts, lease_until
from training_jobs;

drop table training_jobs;
alter table training_jobs_new rename to training_jobs;
create index training_jobs_state_idx on training_jobs (state, id);
