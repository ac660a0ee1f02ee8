//! Hands guest DNS queries (UDP and TCP) to worker threads running the forwarder and routes the
//! answers back to where the query came from.

use super::*;

impl Stack {
    pub(super) fn spawn_dns(&mut self, query: Vec<u8>, to: DnsReturn, transport: Transport) {
        if self.dns_in_flight >= MAX_DNS_IN_FLIGHT {
            debug!("too many DNS lookups in flight; dropping one");
            if let DnsReturn::Tcp { token } = to {
                self.on_dns_done(DnsDone {
                    to: DnsReturn::Tcp { token },
                    reply: None,
                });
            }
            return;
        }
        self.dns_in_flight += 1;
        let upstreams = self.config.upstreams.clone();
        let tx = self.dns_tx.clone();
        let waker = self.waker.clone();
        let spawned = std::thread::Builder::new()
            .name("usernet-dns".into())
            .spawn(move || {
                let reply = dns::answer(&query, &upstreams, transport);
                let _ = tx.send(DnsDone { to, reply });
                let _ = waker.wake();
            });
        if spawned.is_err() {
            self.dns_in_flight -= 1;
        }
    }

    pub(super) fn on_dns_done(&mut self, done: DnsDone) {
        self.dns_in_flight = self.dns_in_flight.saturating_sub(1);
        match done.to {
            DnsReturn::Udp { guest } => {
                if let Some(reply) = done.reply {
                    self.counters.dns_queries.fetch_add(1, Ordering::Relaxed);
                    let from = SocketAddrV4::new(Topology::GATEWAY, 53);
                    self.send_udp_to_guest(from, guest, &reply);
                }
            }
            DnsReturn::Tcp { token } => {
                if let Some(conn) = self.tcp.get_mut(&token) {
                    self.counters.dns_queries.fetch_add(1, Ordering::Relaxed);
                    conn.push_dns_reply(&done.reply.unwrap_or_default());
                }
            }
        }
    }
}
