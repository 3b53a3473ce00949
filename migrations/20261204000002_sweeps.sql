-- Hyperparameter sweeps: a set of ordinary jobs (the trials), ranked by their adapters'
-- report cards when the last one ends; the best may go through the activation policy.
create table sweeps (
    id              integer primary key,
    name            text not null,
    spec            text not null,           -- the sweep as submitted (JSON)
    created_at      text not null default (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    finished_at     text,
    best_job_id     integer,
    decision        text,                    -- what happened to the best trial's adapter
    constraint sweeps_spec_json check (json_valid(spec)),
    constraint sweeps_best_job_fk foreign key (best_job_id) references training_jobs (id) on delete set null
) strict;

alter table training_jobs add column sweep_id integer
    constraint training_jobs_sweep_fk references sweeps (id) on delete set null;

create index training_jobs_sweep_idx on training_jobs (sweep_id);
