-- Classifier fine-tunes (a BERT-family encoder on labelled texts, a ResNet on class
-- folders of images) started from the API or the console. They train a checkpoint
-- folder, not a chat adapter, from a file or folder rather than a stored chat dataset,
-- so they have their own table; their events are the trainer's, as JSON.
create table classifier_jobs (
    id                integer primary key,
    state             text not null default 'queued',
    task              text not null,
    base_model        text not null,           -- the model folder (or resnet18|34|50)
    data_path         text not null,           -- training data, inside imports.dir
    eval_data_path    text,
    settings          text not null,           -- training-YAML keys (JSON)
    output_dir        text not null,
    best_checkpoint   text,
    best_metric       real,
    step              integer not null default 0,
    total_steps       integer,
    cancel_requested  integer not null default 0,
    error             text,
    created_at        text not null default (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    started_at        text,
    finished_at       text,
    constraint classifier_jobs_state_check check (state in ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    constraint classifier_jobs_task_check check (task in ('text_classification', 'image_classification')),
    constraint classifier_jobs_settings_json check (json_valid(settings))
) strict;

create table classifier_job_events (
    id          integer primary key,
    job_id      integer not null,
    kind        text not null,                 -- started, step, evaluated, saved, early_stopped, state
    payload     text not null,
    created_at  text not null default (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    constraint classifier_job_events_payload_json check (json_valid(payload)),
    constraint classifier_job_events_job_fk foreign key (job_id) references classifier_jobs (id) on delete cascade
) strict;

create index classifier_job_events_job_idx on classifier_job_events (job_id, id);
