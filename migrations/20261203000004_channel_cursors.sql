-- The newest message the bot stored per channel (with the channel's server): after
-- downtime the bot reads each channel's history since then, so messages sent while it
-- was down are answered.
create table channel_cursors (
    platform        text not null,
    channel         text not null,
    guild           text,
    last_message_id integer not null,
    updated_at      text not null default (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    constraint channel_cursors_pk primary key (platform, channel)
) strict, without rowid;
