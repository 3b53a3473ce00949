-- A running job holds a lease its worker renews; a job whose lease ran out was left by a
-- worker that died. `attempts` counts claims that did not end in a clean stop, so a job
-- that takes the process down is not claimed again forever.
alter table training_jobs add column attempts integer not null default 0;
alter table training_jobs add column lease_until text;
