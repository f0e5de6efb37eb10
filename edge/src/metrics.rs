//! Prometheus metrics of an edge.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tiercast_engine::metrics::{CodeLabel, seconds_histogram};

#[derive(Clone, Debug)]
pub struct EdgeMetrics {
    pub connections: Gauge,
    pub handshakes: Counter,
    pub deliveries: Counter,
    pub backplane_inbound: Counter,
    pub backplane_malformed: Counter,
    pub errors: Family<CodeLabel, Counter>,
    pub slow_consumers: Counter,
    pub pull_requests: Counter,
    pub pull_store_reads: Counter,
    pub coalesced_notifications: Counter,
    pub stale_read_markers: Counter,
    pub gap_repairs: Counter,
    pub gap_repair_frames: Counter,
    pub backplane_gaps: Counter,
    pub seam_duplicates: Counter,
    pub drained: Counter,
    pub syncs: Counter,
    pub reads: Counter,
    pub handshakes_in_flight: Gauge,
    pub handshakes_refused: Counter,
    /// UDP datagrams the shards received and sent (a GSO batch counts
    /// its segments), and the send calls that carried them.
    pub datagrams_received: Counter,
    pub datagrams_sent: Counter,
    pub send_calls: Counter,
    pub retries_sent: Counter,
    pub tickets: crate::fleet::TicketCounts,
    /// From a message's acceptance (its id) to this edge handing it to
    /// its shards: store, publish and the backplane.
    pub fanout_delay_seconds: Histogram,
    /// One device request (Send, Fetch, Sync, Read, Ack) answered.
    pub request_seconds: Histogram,
    /// A connection's first packet accepted to its TLS handshake done.
    pub handshake_seconds: Histogram,
    /// TLS handshake done to the Hello frame read: the device's side
    /// (control stream opened, Hello sent) and the packets' way.
    pub hello_wait_seconds: Histogram,
    /// Hello read to Welcome written: the edge's work for a connect.
    pub hello_seconds: Histogram,
    /// The Hello's first step: token checked, device registered (a
    /// batched store write).
    pub hello_register_seconds: Histogram,
    /// The Hello's second step: the user's channel subscribed, their
    /// conversations listed (a batched store read) and routed.
    pub hello_attach_seconds: Histogram,
    /// Accepted connections that ended before Welcome, by stage and why.
    pub setups_abandoned: Family<StageLabel, Counter>,
}

/// Where an accepted connection's setup ended without a Welcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabel {
    /// `tls_timeout`, `tls_lost`, `hello_timeout` or `hello_lost`.
    pub stage: &'static str,
}

impl Default for EdgeMetrics {
    fn default() -> Self {
        Self {
            connections: Gauge::default(),
            handshakes: Counter::default(),
            deliveries: Counter::default(),
            backplane_inbound: Counter::default(),
            backplane_malformed: Counter::default(),
            errors: Family::default(),
            slow_consumers: Counter::default(),
            pull_requests: Counter::default(),
            pull_store_reads: Counter::default(),
            coalesced_notifications: Counter::default(),
            stale_read_markers: Counter::default(),
            gap_repairs: Counter::default(),
            gap_repair_frames: Counter::default(),
            backplane_gaps: Counter::default(),
            seam_duplicates: Counter::default(),
            drained: Counter::default(),
            syncs: Counter::default(),
            reads: Counter::default(),
            handshakes_in_flight: Gauge::default(),
            handshakes_refused: Counter::default(),
            datagrams_received: Counter::default(),
            datagrams_sent: Counter::default(),
            send_calls: Counter::default(),
            retries_sent: Counter::default(),
            tickets: crate::fleet::TicketCounts::default(),
            fanout_delay_seconds: seconds_histogram(),
            request_seconds: seconds_histogram(),
            handshake_seconds: seconds_histogram(),
            hello_wait_seconds: seconds_histogram(),
            hello_seconds: seconds_histogram(),
            hello_register_seconds: seconds_histogram(),
            hello_attach_seconds: seconds_histogram(),
            setups_abandoned: Family::default(),
        }
    }
}

impl EdgeMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("tiercast_edge");
        r.register(
            "connections",
            "Open client connections",
            m.connections.clone(),
        );
        r.register(
            "handshakes",
            "Connections that completed Hello",
            m.handshakes.clone(),
        );
        r.register(
            "handshakes_in_flight",
            "QUIC handshakes in progress",
            m.handshakes_in_flight.clone(),
        );
        r.register(
            "handshakes_refused",
            "Connection attempts refused: too many handshakes in flight, or the edge full",
            m.handshakes_refused.clone(),
        );
        r.register(
            "datagrams_received",
            "UDP datagrams received by the QUIC shards",
            m.datagrams_received.clone(),
        );
        r.register(
            "datagrams_sent",
            "UDP datagrams sent by the QUIC shards (GSO segments counted one by one)",
            m.datagrams_sent.clone(),
        );
        r.register(
            "send_calls",
            "Send system calls of the QUIC shards (sendmmsg, or one GSO send)",
            m.send_calls.clone(),
        );
        r.register(
            "fanout_delay_seconds",
            "From a message's acceptance (its id's time) to this edge handing it to its connections",
            m.fanout_delay_seconds.clone(),
        );
        r.register(
            "request_seconds",
            "Time to answer one device request",
            m.request_seconds.clone(),
        );
        r.register(
            "handshake_seconds",
            "From a connection's first packet accepted to its TLS handshake done",
            m.handshake_seconds.clone(),
        );
        r.register(
            "hello_wait_seconds",
            "From a connection's TLS handshake done to its Hello read (the device's side)",
            m.hello_wait_seconds.clone(),
        );
        r.register(
            "hello_seconds",
            "From a connection's Hello read to its Welcome written (the edge's work for a connect)",
            m.hello_seconds.clone(),
        );
        r.register(
            "hello_register_seconds",
            "A Hello's token check and device registration (a batched store write)",
            m.hello_register_seconds.clone(),
        );
        r.register(
            "hello_attach_seconds",
            "A Hello's subscription, conversation listing (a batched store read) and routes",
            m.hello_attach_seconds.clone(),
        );
        r.register(
            "setups_abandoned",
            "Accepted connections that ended before Welcome: in TLS or before Hello, by the edge's timeout or lost",
            m.setups_abandoned.clone(),
        );
        r.register(
            "tls_tickets_issued",
            "TLS session tickets sent to devices",
            m.tickets.issued.clone(),
        );
        r.register(
            "tls_resumptions",
            "Handshakes that presented a good session ticket (resumed: no certificate signature)",
            m.tickets.opened.clone(),
        );
        r.register(
            "tls_tickets_refused",
            "Session tickets refused (expired, another fleet's key, or forged): a full handshake",
            m.tickets.refused.clone(),
        );
        r.register(
            "retries_sent",
            "QUIC Retry packets sent (address validation above the handshake rate)",
            m.retries_sent.clone(),
        );
        r.register(
            "deliveries",
            "Frames enqueued to local connections",
            m.deliveries.clone(),
        );
        r.register(
            "backplane_inbound",
            "Payloads received from the backplane",
            m.backplane_inbound.clone(),
        );
        r.register(
            "backplane_malformed",
            "Backplane payloads that failed verification",
            m.backplane_malformed.clone(),
        );
        r.register("errors", "Errors sent to clients by code", m.errors.clone());
        r.register(
            "slow_consumers",
            "Connections closed because their queue overflowed",
            m.slow_consumers.clone(),
        );
        r.register(
            "pull_requests",
            "Single-message fetches (tier-3 pull on read)",
            m.pull_requests.clone(),
        );
        r.register(
            "pull_store_reads",
            "Store reads made by the pull path (at most one per message per edge while cached)",
            m.pull_store_reads.clone(),
        );
        r.register(
            "coalesced_notifications",
            "Tier-3 notifications set aside for a full queue (one per conversation is sent later)",
            m.coalesced_notifications.clone(),
        );
        r.register(
            "gap_repairs",
            "Gap repairs after the backplane subscriptions were interrupted or dropped payloads (inbox re-drain, tier-2 resync, tier-3 latest id)",
            m.gap_repairs.clone(),
        );
        r.register(
            "backplane_gaps",
            "Payloads for this edge dropped by the backplane (a full queue, a lagging subscriber), each gap repaired from the store",
            m.backplane_gaps.clone(),
        );
        r.register(
            "gap_repair_frames",
            "Frames sent by gap repairs (devices drop those they had by id)",
            m.gap_repair_frames.clone(),
        );
        r.register(
            "stale_read_markers",
            "Read markers not sent because a newer one was sent from here already (a marker never moves back)",
            m.stale_read_markers.clone(),
        );
        r.register(
            "seam_duplicates",
            "Messages not sent twice at a connection's start (stored during the handshake, they reached the writer live and in an inbox page)",
            m.seam_duplicates.clone(),
        );
        r.register(
            "drained",
            "Connections told to reconnect elsewhere at shutdown",
            m.drained.clone(),
        );
        r.register("syncs", "Sync requests served", m.syncs.clone());
        r.register("reads", "Read markers accepted", m.reads.clone());
        m
    }

    pub fn abandoned(&self, stage: &'static str) {
        self.setups_abandoned
            .get_or_create(&StageLabel { stage })
            .inc();
    }

    pub fn error(&self, code: tiercast_schemas::wire::ErrorCode) {
        self.errors
            .get_or_create(&CodeLabel { code: code.name() })
            .inc();
    }
}
