//! Which channels' cursors a gateway message may move: a cursor says every message up to
//! it is stored (see `catch_up`), so it may not pass one still to be read.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

/// The channels whose history may hold messages not yet stored: a message from the
/// gateway moves no cursor before this session's catch-up has listed its channels, nor in
/// a channel whose history is still to be read.
#[derive(Default)]
pub(super) struct Unread {
    /// Set once this session's catch-up has listed its channels.
    pub(super) listed: bool,
    /// Channel -> history reads under way or due (one that failed is tried again until
    /// it is read).
    channels: HashMap<u64, usize>,
}

impl Unread {
    /// Whether a message from the gateway may move `channel`'s cursor.
    pub(super) fn may_advance(&self, channel: u64) -> bool {
        self.listed && !self.channels.contains_key(&channel)
    }

    /// A new gateway session: what was sent since the last one is unread everywhere.
    pub(super) fn new_session(&mut self) {
        self.listed = false;
    }

    pub(super) fn add(&mut self, channel: u64) {
        *self.channels.entry(channel).or_default() += 1;
    }

    /// One read of `channel`'s history done.
    pub(super) fn read(&mut self, channel: u64) {
        if let Entry::Occupied(mut e) = self.channels.entry(channel) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}
