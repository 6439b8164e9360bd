-- The in-app feed: engagement statuses of messages (each the time of the
-- latest action; null when not set), the workflow's categories (a feed
-- filter), and indexes for a user's feed of one channel and its counts.

ALTER TABLE herald_messages
    ADD COLUMN seen_at timestamptz,
    ADD COLUMN read_at timestamptz,
    ADD COLUMN archived_at timestamptz,
    ADD COLUMN interacted_at timestamptz,
    ADD COLUMN clicked_at timestamptz,
    ADD COLUMN link_clicked_at timestamptz,
    ADD COLUMN categories text[] NOT NULL DEFAULT '{}';

CREATE INDEX herald_messages_feed ON herald_messages (namespace, channel, recipient_id, inserted_at DESC, id DESC)
    WHERE channel_type = 'in_app_feed' AND recipient_collection = '';
CREATE INDEX herald_messages_feed_unread ON herald_messages (namespace, channel, recipient_id)
    WHERE channel_type = 'in_app_feed' AND recipient_collection = '' AND read_at IS NULL AND archived_at IS NULL;
CREATE INDEX herald_messages_feed_unseen ON herald_messages (namespace, channel, recipient_id)
    WHERE channel_type = 'in_app_feed' AND recipient_collection = '' AND seen_at IS NULL AND archived_at IS NULL;
