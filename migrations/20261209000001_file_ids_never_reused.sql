-- A deleted file's id is never given to a later file: OpenAI clients keep file ids (a
-- job's `training_file`, a script that deletes its upload afterwards), and with the
-- rowid's reuse of the highest id an upload after a delete took the deleted file's id,
-- so an old id named another file. `autoincrement` keeps the highest id ever given.
-- Rebuilt as in 20261207000001 (foreign keys off on the migration connection; the
-- guard refuses otherwise on a database that has files).
create temp table migration_guard (foreign_keys_off_or_no_files integer check (foreign_keys_off_or_no_files = 1));
insert into migration_guard
    select (select foreign_keys from pragma_foreign_keys) = 0 or not exists (select 1 from files);
drop table migration_guard;

create table files_new (
    id          integer primary key autoincrement,
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
