-- A running classifier job holds a lease its worker renews, as training jobs do: a job
-- whose lease ran out was left by a worker that died (a crash, an out-of-memory kill) and
-- goes back to the queue, or fails after too many claims, instead of every worker start
-- putting every running classifier job back (which restarted another live worker's job
-- and retried a job that crashes the process forever).
alter table classifier_jobs add column lease_until text;
alter table classifier_jobs add column attempts integer not null default 0;
