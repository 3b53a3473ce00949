-- A job whose training and report card are done marks itself `publishing` before it
-- stores its adapter and lets the gate act on it. Both that mark and a cancel request
-- are conditional updates of the row, so one of them wins: a cancel that comes first
-- stops the job before anything is published, one that comes later is refused (409)
-- instead of accepted and then ignored while the adapter goes live.
alter table training_jobs add column publishing integer not null default 0;
