//! Leadership among several managers sharing one etcd (docs/manager-ha.md).
//!
//! Every manager campaigns: it takes an etcd lease of `lease_ttl` and tries to create the
//! leader key (`<prefix>leader`) bound to that lease, in a transaction that succeeds only
//! if the key does not exist. The winner's **epoch** is the create revision of its leader
//! key: etcd revisions only grow, so every later leader has a larger epoch, and a key
//! recreated by anyone else has another create revision.
//!
//! Every write a leader makes (engine snapshot, audit lines, fence and VM start intents)
//! is a transaction whose compare checks that the leader key's create revision is still
//! its epoch: a deposed leader's write fails and it stops (steps down by exiting; systemd
//! restarts it as a follower). Before each fence and each VM start the leader also checks
//! its local deadline: the last keepalive etcd answered, plus the TTL, minus a margin. A
//! leader cut off from etcd therefore stops acting before its lease can expire, and only
//! then can another manager win the key.

use crate::etcd::{Compare, EtcdClient, EtcdError, Op};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How often a follower looks for a free leader key.
pub const CAMPAIGN_EVERY: Duration = Duration::from_millis(250);
/// Exit status of a manager that lost leadership (systemd restarts it as a follower).
pub const STEP_DOWN_EXIT_CODE: i32 = 3;

/// What the leader key says: where agents and operators find the leader.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderInfo {
    /// `https://HOST:PORT` agents ping.
    pub agent_url: String,
    /// `http://HOST:PORT` of the operator API.
    pub api_url: String,
    /// The leader's process id and start time, for logs.
    pub id: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Not the leader; the current leader if one is known.
    Follower { leader: Option<LeaderInfo> },
    /// The leader, with its epoch.
    Leader { epoch: i64 },
}

/// An action the leader may not take (not leader, deadline passed, epoch superseded, or
/// the intent could not be recorded for certain).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.0)
    }
}

#[derive(Debug)]
struct Inner {
    client: EtcdClient,
    prefix: String,
    ttl: Duration,
    margin: Duration,
    me: LeaderInfo,
    role: watch::Sender<Role>,
    /// Leader only: no action after this instant.
    act_until: Mutex<Option<Instant>>,
    /// The lease our leader key is bound to, once elected.
    lease: Mutex<Option<i64>>,
    /// A clean stop is handing leadership over: losing it is expected, not a step-down.
    resigning: std::sync::atomic::AtomicBool,
}

#[derive(Clone, Debug)]
pub struct Leadership {
    inner: Arc<Inner>,
}

impl Leadership {
    pub fn new(config: &crate::config::EtcdConfig) -> Result<Leadership, EtcdError> {
        let client = EtcdClient::new(&config.settings)?;
        let (role, _) = watch::channel(Role::Follower { leader: None });
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_millis())
            .unwrap_or(0);
        Ok(Leadership {
            inner: Arc::new(Inner {
                client,
                prefix: config.prefix.clone(),
                ttl: config.lease_ttl,
                // Room for clock rate differences and for one request in flight.
                margin: (config.lease_ttl / 5).max(Duration::from_millis(500)),
                me: LeaderInfo {
                    agent_url: config.agent_url.clone(),
                    api_url: config.api_url.clone(),
                    id: format!("pid {} started {started}", std::process::id()),
                },
                role,
                act_until: Mutex::new(None),
                lease: Mutex::new(None),
                resigning: Default::default(),
            }),
        })
    }

    pub fn client(&self) -> &EtcdClient {
        &self.inner.client
    }

    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    pub fn leader_key(&self) -> String {
        format!("{}leader", self.inner.prefix)
    }

    pub fn role(&self) -> Role {
        self.inner.role.borrow().clone()
    }

    pub fn watch(&self) -> watch::Receiver<Role> {
        self.inner.role.subscribe()
    }

    /// The epoch, while this manager is the leader.
    pub fn epoch(&self) -> Option<i64> {
        match *self.inner.role.borrow() {
            Role::Leader { epoch } => Some(epoch),
            Role::Follower { .. } => None,
        }
    }

    /// `None` while leader; otherwise the leader as far as known (for redirects).
    pub fn follower_hint(&self) -> Option<Option<LeaderInfo>> {
        match &*self.inner.role.borrow() {
            Role::Leader { .. } => None,
            Role::Follower { leader } => Some(leader.clone()),
        }
    }

    /// Ok with the epoch while this manager is the leader and its lease surely holds.
    pub fn may_act(&self) -> Result<i64, Refused> {
        let Some(epoch) = self.epoch() else { return Err(Refused("not the leader".into())) };
        if self.inner.resigning.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Refused(format!("leader epoch {epoch}: stopping")));
        }
        let until = *self.inner.act_until.lock().expect("deadline lock");
        match until {
            Some(until) if Instant::now() < until => Ok(epoch),
            _ => Err(Refused(format!("leader epoch {epoch}: etcd lease not renewed in time"))),
        }
    }

    /// The compare every leader write carries.
    pub fn epoch_compare(&self, epoch: i64) -> Compare {
        Compare::CreateRevision { key: self.leader_key(), revision: epoch }
    }

    /// Stops this manager for good: a deposed leader must not take one more action, and
    /// in-flight tasks die with the process. systemd restarts it as a follower.
    pub fn step_down(&self, reason: &str) -> ! {
        if self.inner.resigning.load(std::sync::atomic::Ordering::SeqCst) {
            tracing::info!(reason, "leadership handed over: stopping");
            std::process::exit(0)
        }
        tracing::error!(reason, "leadership lost: stepping down (exit {STEP_DOWN_EXIT_CODE}); no further action");
        eprintln!("kvmha manager: leadership lost ({reason}): stepping down");
        std::process::exit(STEP_DOWN_EXIT_CODE)
    }

    /// Records `value` at `<prefix><key>` in a transaction that holds only while this
    /// manager's epoch is current, then checks the deadline again. Ok: the record is
    /// committed and the leader may act now. An unknown outcome is settled by reading the
    /// key back; if that fails too, the action is refused (the engine retries later).
    pub async fn record(&self, key: &str, value: Vec<u8>) -> Result<i64, Refused> {
        let epoch = self.may_act()?;
        let key = format!("{}{key}", self.inner.prefix);
        let put = Op::Put { key: key.clone(), value: value.clone(), lease: 0 };
        let answer = self.inner.client.txn(&[self.epoch_compare(epoch)], &[put], &[]).await;
        match answer {
            Ok(result) if result.succeeded => {}
            Ok(_) => self.step_down(&format!("epoch {epoch} superseded: another manager holds the leader key")),
            Err(error) if error.is_unknown() => {
                tracing::warn!(%error, key, "intent write outcome unknown: reading it back");
                let read = self.inner.client.range(&key, "", 1).await;
                match read {
                    Ok((kvs, _)) if kvs.first().is_some_and(|kv| kv.value == value) => {}
                    Ok(_) => return Err(Refused(format!("intent {key} not recorded (write timed out)"))),
                    Err(error) => return Err(Refused(format!("intent {key}: outcome unknown: {error}"))),
                }
            }
            Err(error) => return Err(Refused(format!("intent {key} not recorded: {error}"))),
        }
        self.may_act()
    }

    /// A clean stop: no more actions, then the lease is revoked so that another manager
    /// takes over at once instead of after the TTL.
    pub async fn resign(&self) {
        // From here on `may_act` refuses: nothing of ours acts after the lease is gone.
        self.inner.resigning.store(true, std::sync::atomic::Ordering::SeqCst);
        let lease = self.inner.lease.lock().expect("lease lock").take();
        if let Some(lease) = lease {
            match self.inner.client.revoke(lease).await {
                Ok(()) => tracing::info!("leadership handed over: lease revoked"),
                Err(error) => tracing::warn!(%error, "lease not revoked: a successor waits for its TTL"),
            }
        }
    }

    /// Reads `<prefix><key>`.
    pub async fn read(&self, key: &str) -> Result<Option<Vec<u8>>, EtcdError> {
        let key = format!("{}{key}", self.inner.prefix);
        let (kvs, _) = self.inner.client.range(&key, "", 1).await?;
        Ok(kvs.into_iter().next().map(|kv| kv.value))
    }

    /// Campaigns until elected, then keeps the lease alive; steps down (exits) when the
    /// lease is lost or cannot be renewed before the deadline. Runs for the process's life.
    pub async fn run(self) {
        let epoch = self.elect().await;
        self.keep_leading(epoch).await
    }

    /// Campaigns until elected; returns the epoch. The lease is then renewed only by
    /// [`Leadership::run`] (tests use this alone to hold a lease that runs out).
    pub async fn elect(&self) -> i64 {
        let epoch = self.campaign().await;
        tracing::info!(epoch, me = %self.inner.me.agent_url, "elected leader");
        self.inner.role.send_replace(Role::Leader { epoch });
        epoch
    }

    fn set_deadline(&self, lease_from: Instant) {
        let until = lease_from + self.inner.ttl - self.inner.margin;
        *self.inner.act_until.lock().expect("deadline lock") = Some(until);
    }

    async fn campaign(&self) -> i64 {
        let client = &self.inner.client;
        let key = self.leader_key();
        let me = serde_json::to_vec(&self.inner.me).unwrap_or_default();
        let mut lease: Option<(i64, Instant)> = None;
        loop {
            // A lease of our own, renewed while we wait, so that winning is one write.
            let (id, granted_at) = match lease {
                Some((id, renewed)) if renewed.elapsed() < self.inner.ttl / 3 => (id, renewed),
                Some((id, _)) => {
                    let sent = Instant::now();
                    match client.keepalive(id).await {
                        Ok(true) => {
                            lease = Some((id, sent));
                            (id, sent)
                        }
                        _ => {
                            lease = None;
                            continue;
                        }
                    }
                }
                None => {
                    let sent = Instant::now();
                    match client.grant(self.inner.ttl).await {
                        Ok(id) => {
                            lease = Some((id, sent));
                            (id, sent)
                        }
                        Err(error) => {
                            tracing::warn!(%error, "campaign: no etcd lease");
                            tokio::time::sleep(CAMPAIGN_EVERY).await;
                            continue;
                        }
                    }
                }
            };
            let put = Op::Put { key: key.clone(), value: me.clone(), lease: id };
            let absent = Compare::CreateRevision { key: key.clone(), revision: 0 };
            match client.txn(&[absent], &[put], &[Op::Get { key: key.clone() }]).await {
                Ok(result) if result.succeeded => {
                    self.set_deadline(granted_at);
                    *self.inner.lease.lock().expect("lease lock") = Some(id);
                    return result.revision;
                }
                Ok(result) => {
                    let leader = result
                        .reads
                        .first()
                        .and_then(|kvs| kvs.first())
                        .and_then(|kv| serde_json::from_slice::<LeaderInfo>(&kv.value).ok());
                    self.inner.role.send_if_modified(|role| {
                        let next = Role::Follower { leader: leader.clone() };
                        let changed = *role != next;
                        *role = next;
                        changed
                    });
                }
                Err(error) => {
                    // Unknown: perhaps we won. Read the key back: ours if it holds our lease.
                    tracing::warn!(%error, "campaign write outcome unknown: reading the leader key");
                    if let Ok((kvs, _)) = client.range(&key, "", 1).await {
                        if let Some(kv) = kvs.first().filter(|kv| kv.lease == id) {
                            self.set_deadline(granted_at);
                            *self.inner.lease.lock().expect("lease lock") = Some(id);
                            return kv.create_revision;
                        }
                    }
                }
            }
            tokio::time::sleep(CAMPAIGN_EVERY).await;
        }
    }

    async fn keep_leading(&self, epoch: i64) {
        let client = &self.inner.client;
        let key = self.leader_key();
        let lease = match client.range(&key, "", 1).await {
            Ok((kvs, _)) => match kvs.first() {
                Some(kv) if kv.create_revision == epoch => kv.lease,
                _ => self.step_down(&format!("epoch {epoch}: leader key gone or recreated")),
            },
            Err(_) => 0,
        };
        let every = self.inner.ttl / 4;
        let watchdog = {
            let leadership = self.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if leadership.inner.resigning.load(std::sync::atomic::Ordering::SeqCst) {
                        return;
                    }
                    if let Err(refused) = leadership.may_act() {
                        leadership.step_down(&refused.0);
                    }
                }
            })
        };
        let mut lease = lease;
        loop {
            tokio::time::sleep(every).await;
            if lease == 0 {
                // The first read failed: find our lease now (the deadline watchdog bounds this).
                if let Ok((kvs, _)) = client.range(&key, "", 1).await {
                    match kvs.first() {
                        Some(kv) if kv.create_revision == epoch => lease = kv.lease,
                        _ => self.step_down(&format!("epoch {epoch}: leader key gone or recreated")),
                    }
                }
                continue;
            }
            let sent = Instant::now();
            match client.keepalive(lease).await {
                Ok(true) => self.set_deadline(sent),
                Ok(false) => self.step_down(&format!("epoch {epoch}: etcd lease expired")),
                Err(error) => tracing::warn!(%error, "leader lease keepalive failed"),
            }
            if watchdog.is_finished() {
                return;
            }
        }
    }
}
