-- Lookups by platform id that scanned whole tables: the Discord bot's threads (is this
-- channel one of its threads?) on every message, and a reply by its platform message id
-- on every reaction.
create index conversations_thread_idx on conversations (platform_thread_id)
    where platform_thread_id is not null;
create index messages_platform_message_idx on messages (platform_message_id)
    where platform_message_id is not null;
