-- /forget takes a user's text out of dataset versions built before: each such version
-- gets a successor without it, and its own rows are deleted (the version itself too,
-- unless a training job names it: then it stays, empty, as the job's record).
create table dataset_purges (
    dataset_id      integer not null primary key,
    successor_id    integer,
    purged_at       text not null default (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    constraint dataset_purges_dataset_fk foreign key (dataset_id) references datasets (id) on delete cascade,
    constraint dataset_purges_successor_fk foreign key (successor_id) references datasets (id) on delete set null
) strict;

-- An adapter trained on data a user asked to forget: listed for the operator to retrain
-- or retire.
alter table adapters add column forgotten_data_at text;
