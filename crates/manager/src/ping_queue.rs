//! The pings' way into the engine thread: one slot per host, newest ping wins.
//!
//! Pings are the only traffic that grows with the fleet (every host, every ping interval),
//! and the only traffic that may be thinned: a newer ping of a host says everything an
//! older one said (the host's boot, its sequence number, the state of every VM it runs),
//! so when the engine thread falls behind, a queued ping is replaced by the next one of
//! the same host (coalesced) and both waiters get the outcome of the newer one. The queue
//! holds at most one ping per host and at most `capacity` hosts; a ping that finds it full
//! is refused (the agent hears 503 and pings again at its next interval) and counted.
//! Every other request (investigator reports, fence and start results, joins, operator
//! actions) keeps its own bounded channel in the controller, where a sender waits rather
//! than lose anything, and never queues behind thousands of pings.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Hosts with a ping waiting at once. Far above any fleet one manager carries (issue 9
/// targets 10,000 hosts), so it only binds against a flood of distinct names.
pub const PING_SLOTS_MAX: usize = 65_536;

/// What [`CoalescingQueue::push`] did with an item.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed<W> {
    /// Queued in a new slot. `wake`: the queue was idle, so the consumer must be told
    /// (exactly one push between two drains says so).
    Queued { wake: bool },
    /// Replaced the item waiting under the same key; its waiter now waits for this one.
    Coalesced,
    /// The queue is full: nothing was queued; the waiter comes back to the caller.
    Refused(W),
}

/// Counters of the ping path, for `/metrics`.
#[derive(Debug, Default)]
pub struct PingCounters {
    /// Pings queued for the engine.
    pub queued: AtomicU64,
    /// Pings replaced by a newer ping of the same host before the engine took them.
    pub coalesced: AtomicU64,
    /// Pings refused because the queue was full.
    pub refused: AtomicU64,
    /// Pings the engine stepped.
    pub stepped: AtomicU64,
}

/// A queue that keeps one item per key, in the order the keys first arrived: a newer
/// item of a waiting key replaces the older one (keeping its place) and adds its waiter.
#[derive(Debug)]
pub struct CoalescingQueue<K, V, W> {
    inner: Mutex<Inner<K, V, W>>,
    capacity: usize,
    pub counters: PingCounters,
}

#[derive(Debug)]
struct Inner<K, V, W> {
    slots: HashMap<K, (V, Vec<W>)>,
    order: VecDeque<K>,
    /// A wake-up was handed out and no drain has happened since.
    awake: bool,
}

impl<K: Eq + Hash + Clone, V, W> CoalescingQueue<K, V, W> {
    pub fn new(capacity: usize) -> Self {
        assert!(capacity > 0, "a queue of no slots refuses everything");
        CoalescingQueue {
            inner: Mutex::new(Inner { slots: HashMap::new(), order: VecDeque::new(), awake: false }),
            capacity,
            counters: PingCounters::default(),
        }
    }

    pub fn push(&self, key: K, item: V, waiter: W) -> Pushed<W> {
        let mut inner = self.inner.lock().expect("ping queue lock");
        if let Some((waiting, waiters)) = inner.slots.get_mut(&key) {
            *waiting = item;
            waiters.push(waiter);
            self.counters.coalesced.fetch_add(1, Ordering::Relaxed);
            return Pushed::Coalesced;
        }
        if inner.slots.len() >= self.capacity {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            return Pushed::Refused(waiter);
        }
        inner.order.push_back(key.clone());
        inner.slots.insert(key, (item, vec![waiter]));
        self.counters.queued.fetch_add(1, Ordering::Relaxed);
        let wake = !inner.awake;
        inner.awake = true;
        Pushed::Queued { wake }
    }

    /// Takes every waiting item, oldest key first. The next push after this wakes the
    /// consumer again.
    pub fn drain(&self) -> Vec<(V, Vec<W>)> {
        let mut inner = self.inner.lock().expect("ping queue lock");
        inner.awake = false;
        let order = std::mem::take(&mut inner.order);
        let mut items = Vec::with_capacity(order.len());
        for key in order {
            if let Some(slot) = inner.slots.remove(&key) {
                items.push(slot);
            }
        }
        self.counters.stepped.fetch_add(items.len() as u64, Ordering::Relaxed);
        items
    }

    pub fn len(&self) -> usize {
        self.inner.lock().expect("ping queue lock").slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The ping path's lines of `/metrics` (Prometheus text format).
pub fn render_metrics<K: Eq + Hash + Clone, V, W>(queue: &CoalescingQueue<K, V, W>) -> String {
    let counters = &queue.counters;
    let mut text = String::new();
    let mut counter = |name: &str, help: &str, value: u64| {
        text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n"));
    };
    counter("kvmha_pings_queued_total", "Pings queued for the engine.", counters.queued.load(Ordering::Relaxed));
    counter(
        "kvmha_pings_coalesced_total",
        "Pings replaced by a newer ping of the same host before the engine took them.",
        counters.coalesced.load(Ordering::Relaxed),
    );
    counter(
        "kvmha_pings_refused_total",
        "Pings refused (503) because the ping queue was full.",
        counters.refused.load(Ordering::Relaxed),
    );
    counter("kvmha_pings_stepped_total", "Pings the engine stepped.", counters.stepped.load(Ordering::Relaxed));
    text.push_str(&format!(
        "# HELP kvmha_ping_queue_hosts Hosts with a ping waiting for the engine.\n# TYPE kvmha_ping_queue_hosts gauge\nkvmha_ping_queue_hosts {}\n",
        queue.len()
    ));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_item_of_a_waiting_key_replaces_it_and_both_waiters_get_its_outcome() {
        let queue: CoalescingQueue<&str, u64, &str> = CoalescingQueue::new(8);
        assert_eq!(queue.push("host1", 1, "first"), Pushed::Queued { wake: true });
        assert_eq!(queue.push("host2", 1, "other"), Pushed::Queued { wake: false });
        assert_eq!(queue.push("host1", 2, "second"), Pushed::Coalesced);
        let drained = queue.drain();
        assert_eq!(drained, vec![(2, vec!["first", "second"]), (1, vec!["other"])]);
        assert_eq!(queue.counters.coalesced.load(Ordering::Relaxed), 1);
        assert_eq!(queue.counters.stepped.load(Ordering::Relaxed), 2);
        assert!(queue.is_empty());
    }

    #[test]
    fn keys_keep_the_order_they_first_arrived_in() {
        let queue: CoalescingQueue<u32, u32, ()> = CoalescingQueue::new(8);
        for key in [3, 1, 2] {
            queue.push(key, key * 10, ());
        }
        queue.push(3, 31, ());
        let items: Vec<u32> = queue.drain().into_iter().map(|(item, _)| item).collect();
        assert_eq!(items, vec![31, 10, 20]);
    }

    #[test]
    fn a_full_queue_refuses_a_new_key_hands_the_waiter_back_and_counts_it_but_still_coalesces() {
        let queue: CoalescingQueue<u32, u32, &str> = CoalescingQueue::new(2);
        queue.push(1, 1, "a");
        queue.push(2, 2, "b");
        assert_eq!(queue.push(3, 3, "c"), Pushed::Refused("c"));
        assert_eq!(queue.counters.refused.load(Ordering::Relaxed), 1);
        // A host already waiting is never refused: its newer ping replaces the old one.
        assert_eq!(queue.push(2, 22, "d"), Pushed::Coalesced);
        assert_eq!(queue.len(), 2);
        let text = render_metrics(&queue);
        assert!(text.contains("kvmha_pings_refused_total 1\n"), "{text}");
        assert!(text.contains("kvmha_pings_coalesced_total 1\n"), "{text}");
        assert!(text.contains("kvmha_ping_queue_hosts 2\n"), "{text}");
    }

    #[test]
    fn exactly_one_push_between_two_drains_wakes_the_consumer() {
        let queue: CoalescingQueue<u32, u32, ()> = CoalescingQueue::new(8);
        assert_eq!(queue.push(1, 1, ()), Pushed::Queued { wake: true });
        assert_eq!(queue.push(2, 2, ()), Pushed::Queued { wake: false });
        assert_eq!(queue.drain().len(), 2);
        // Drained while empty still re-arms: the next push wakes.
        assert!(queue.drain().is_empty());
        assert_eq!(queue.push(1, 3, ()), Pushed::Queued { wake: true });
    }
}
