-- OpenAI's result files: a succeeded job's step metrics as a CSV file with purpose
-- `fine-tune-results`, listed in the job's `result_files`. The purpose check of `files`
-- widens, which SQLite cannot do in place: the table is rebuilt (new table, copy, drop,
-- rename) on `Db::open`'s migration connection, whose foreign keys are off, so dropping
-- the old table leaves the jobs' links to their files as they are (checked after the
-- migrations by `foreign_key_check`). The guard refuses to run otherwise on a database
-- that has files.
create temp table migration_guard (foreign_keys_off_or_no_files integer check (foreign_keys_off_or_no_files = 1));
insert into migration_guard
    select (select foreign_keys from pragma_foreign_keys) = 0 or not exists (select 1 from files);
drop table migration_guard;

create table files_new (
    id          integer primary key,
    filename    text not null,
    purpose     text not null,
    bytes       integer not null,
    content     blob not null,
    created_at  text not null default (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    constraint files_purpose_check check (purpose in ('fine-tune', 'fine-tune-results')),
    constraint files_filename_check check (length(filename) between 1 and 255)
) strict;
insert into files_new (id, filename, purpose, bytes, content, created_at)
    select id, filename, purpose, bytes, content, created_at from files;
drop table files;
alter table files_new rename to files;

alter table training_jobs add column result_file_id integer
    references files (id) on delete set null;
