//! Where the session's notifications go: the queue between the client's callback and the
//! source task (one owner of the queue and its two wake-ups), and the data changes of one
//! publish response.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use opcua::client::{MonitoredItemMap, OnSubscriptionNotificationCore};
use opcua::types::{DataChangeNotification, DataValue, NodeId, NotificationMessage};
use tokio::sync::Notify;

/// Values taken from the session (notifications, republished ones, reads) waiting for
/// the source's task, in order; the one hand-off between the session and the task.
#[derive(Debug, Default)]
pub(super) struct Inbox {
    pub(super) values: Mutex<VecDeque<(usize, DataValue)>>,
    /// Values were put.
    pub(super) arrived: Notify,
    /// Values were taken: the session's poller may go on.
    pub(super) drained: Notify,
}

impl Inbox {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(usize, DataValue)>> {
        // Plain data; a panic elsewhere cannot leave it half-written.
        self.values.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn put(&self, values: impl IntoIterator<Item = (usize, DataValue)>) {
        let mut queue = self.lock();
        let before = queue.len();
        queue.extend(values);
        let added = queue.len() > before;
        drop(queue);
        if added {
            self.arrived.notify_one();
        }
    }

    /// Up to `max` values, the oldest first.
    pub(super) fn take(&self, max: usize) -> Vec<(usize, DataValue)> {
        let mut queue = self.lock();
        let n = queue.len().min(max);
        let taken = queue.drain(..n).collect();
        drop(queue);
        self.drained.notify_one();
        taken
    }

    /// Returns once fewer than `max` values wait.
    pub(super) async fn room(&self, max: usize) {
        while self.lock().len() >= max {
            self.drained.notified().await;
        }
    }
}

/// The subscription's callback: maps each value to its node and queues it, and keeps
/// the last notification's sequence number and each client handle's node (for
/// republishing what a reconnect missed).
pub(super) struct Collector {
    pub(super) inbox: Arc<Inbox>,
    pub(super) by_node: Arc<HashMap<NodeId, usize>>,
    pub(super) seen: Arc<Seen>,
}

/// What the callback learnt that republishing needs.
#[derive(Debug, Default)]
pub(super) struct Seen {
    pub(super) last_sequence: std::sync::atomic::AtomicU32,
    pub(super) by_handle: Mutex<HashMap<u32, usize>>,
}

/// The data values of a notification message, by client handle.
pub(super) fn data_changes(message: &NotificationMessage) -> Vec<(u32, DataValue)> {
    let mut out = Vec::new();
    for object in message.notification_data.iter().flatten() {
        if let Some(change) = object.inner_as::<DataChangeNotification>() {
            for item in change.monitored_items.iter().flatten() {
                out.push((item.client_handle, item.value.clone()));
            }
        }
    }
    out
}

impl OnSubscriptionNotificationCore for Collector {
    fn on_subscription_notification(
        &mut self,
        message: NotificationMessage,
        items: MonitoredItemMap<'_>,
    ) {
        if message
            .notification_data
            .as_ref()
            .is_some_and(|d| !d.is_empty())
        {
            self.seen.last_sequence.fetch_max(
                message.sequence_number,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        let mut values = Vec::new();
        let mut by_handle = self
            .seen
            .by_handle
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for (handle, value) in data_changes(&message) {
            let index = items
                .get(handle)
                .and_then(|item| self.by_node.get(&item.item_to_monitor().node_id).copied());
            if let Some(index) = index {
                by_handle.insert(handle, index);
                values.push((index, value));
            }
        }
        drop(by_handle);
        self.inbox.put(values);
    }
}
