//! Guest UDP and ICMP: DHCP, NAT'ed flows through connected host sockets, echo requests through
//! ping sockets, and the frames that carry their answers back.

use super::*;

impl Stack {
    pub(super) fn on_guest_udp(&mut self, src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) {
        if dst.port() == 67 && src.port() == 68 {
            return self.on_dhcp(payload);
        }
        if !policy::valid_guest_source(*src.ip()) {
            return;
        }
        if *dst.ip() == Topology::GATEWAY {
            if let Some((token, peer)) = self.udp_forward_ports.get(&dst.port()).copied() {
                if let Some(fwd) = self.udp_forwards.get_mut(&token) {
                    let _ = fwd.socket.send_to(payload, peer);
                    if let Some(p) = fwd.peers.get_mut(&peer) {
                        p.1 = Instant::now();
                    }
                }
                return;
            }
        }
        match policy::target(dst, self.config.allow_host) {
            Target::Dns => self.spawn_dns(
                payload.to_vec(),
                DnsReturn::Udp { guest: src },
                Transport::Udp,
            ),
            Target::Refuse => {
                self.counters
                    .refused_connects
                    .fetch_add(1, Ordering::Relaxed);
            }
            Target::Host(addr) => self.nat_udp(src, dst, addr, payload),
        }
    }

    pub(super) fn nat_udp(
        &mut self,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        host: SocketAddrV4,
        payload: &[u8],
    ) {
        let token = match self.flow_by_tuple.get(&(src, dst)) {
            Some(t) => *t,
            None => {
                if self.flows.len() >= udp::MAX_FLOWS {
                    self.evict_oldest_flow();
                }
                let Ok(mut socket) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0).into()) else {
                    return;
                };
                if socket.connect(SocketAddr::V4(host)).is_err() {
                    return;
                }
                let token = self.token();
                if self
                    .poll
                    .registry()
                    .register(&mut socket, token, Interest::READABLE)
                    .is_err()
                {
                    return;
                }
                self.flows.insert(
                    token,
                    UdpFlow {
                        guest: src,
                        remote: dst,
                        socket,
                        last: Instant::now(),
                    },
                );
                self.flow_by_tuple.insert((src, dst), token);
                self.counters.udp_flows.fetch_add(1, Ordering::Relaxed);
                token
            }
        };
        if let Some(flow) = self.flows.get_mut(&token) {
            flow.last = Instant::now();
            let _ = flow.socket.send(payload);
        }
    }

    pub(super) fn evict_oldest_flow(&mut self) {
        if let Some(t) = self
            .flows
            .iter()
            .min_by_key(|(_, f)| f.last)
            .map(|(t, _)| *t)
        {
            self.remove_flow(t);
        }
    }

    pub(super) fn remove_flow(&mut self, token: Token) {
        if let Some(mut flow) = self.flows.remove(&token) {
            self.flow_by_tuple.remove(&(flow.guest, flow.remote));
            let _ = self.poll.registry().deregister(&mut flow.socket);
            self.counters.udp_flows.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub(super) fn read_flow(&mut self, token: Token) {
        let mut buf = [0u8; 65536];
        let mut datagrams = Vec::new();
        let Some(flow) = self.flows.get_mut(&token) else {
            return;
        };
        loop {
            match flow.socket.recv(&mut buf) {
                Ok(n) => datagrams.push(buf[..n].to_vec()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break, // WouldBlock, or an ICMP error reported on the socket
            }
            if datagrams.len() >= 64 {
                // More may be waiting and mio is edge-triggered: come back next round.
                self.pending_reads.push(token);
                break;
            }
        }
        flow.last = Instant::now();
        let (from, to) = (flow.remote, flow.guest);
        for d in datagrams {
            self.send_udp_to_guest(from, to, &d);
        }
    }

    /// Sends a guest echo request out through a ping socket; false if it cannot go.
    pub(super) fn on_guest_ping(&mut self, src: Ipv4Addr, dst: Ipv4Addr, icmp: &[u8]) -> bool {
        let Ok(echo) = Icmpv4Packet::new_checked(icmp) else {
            return false;
        };
        if echo.msg_type() != Icmpv4Message::EchoRequest || !echo.verify_checksum() {
            return false;
        }
        if policy::target(SocketAddrV4::new(dst, 1), false) == Target::Refuse {
            return false;
        }
        let key = (src, dst, echo.echo_ident());
        let token = match self.ping_by_key.get(&key) {
            Some(t) => *t,
            None => {
                if self.ping_denied || self.pings.len() >= udp::MAX_FLOWS {
                    return false;
                }
                let mut socket = match udp::ping_socket() {
                    Ok(s) => s,
                    Err(e) => {
                        // A known gap: without ping sockets (net.ipv4.ping_group_range) the guest
                        // cannot ping beyond the gateway; say so once.
                        warn!(error = %e, "no unprivileged ping sockets: guest ICMP echo is dropped");
                        self.ping_denied = true;
                        return false;
                    }
                };
                let token = self.token();
                if self
                    .poll
                    .registry()
                    .register(&mut socket, token, Interest::READABLE)
                    .is_err()
                {
                    return false;
                }
                self.pings.insert(
                    token,
                    IcmpFlow {
                        guest: src,
                        remote: dst,
                        guest_id: echo.echo_ident(),
                        socket,
                        last: Instant::now(),
                    },
                );
                self.ping_by_key.insert(key, token);
                token
            }
        };
        let Some(flow) = self.pings.get_mut(&token) else {
            return false;
        };
        flow.last = Instant::now();
        let _ = flow
            .socket
            .send_to(icmp, SocketAddr::V4(SocketAddrV4::new(dst, 0)));
        true
    }

    pub(super) fn read_ping(&mut self, token: Token) {
        let mut buf = [0u8; 65536];
        let mut replies = Vec::new();
        let Some(flow) = self.pings.get_mut(&token) else {
            return;
        };
        while let Ok((n, _)) = flow.socket.recv_from(&mut buf) {
            let mut reply = buf[..n].to_vec();
            if let Ok(mut p) = Icmpv4Packet::new_checked(&mut reply[..]) {
                if p.msg_type() == Icmpv4Message::EchoReply {
                    p.set_echo_ident(flow.guest_id);
                    replies.push(reply);
                }
            }
            if replies.len() >= 64 {
                self.pending_reads.push(token);
                break;
            }
        }
        flow.last = Instant::now();
        let (from, to) = (flow.remote, flow.guest);
        let Some(mac) = self.guest_mac else {
            return;
        };
        for r in replies {
            let frame = packet::icmp_frame(Topology::GATEWAY_MAC, mac, from, to, &r);
            self.device.send_frame(&frame);
        }
    }

    pub(super) fn send_udp_to_guest(
        &mut self,
        from: SocketAddrV4,
        to: SocketAddrV4,
        payload: &[u8],
    ) {
        let Some(mac) = self.guest_mac else {
            return;
        };
        self.next_ip_ident = self.next_ip_ident.wrapping_add(1);
        let frames = packet::udp_frames(
            Topology::GATEWAY_MAC,
            mac,
            from,
            to,
            payload,
            usize::from(Topology::MTU),
            self.next_ip_ident,
        );
        for frame in frames {
            self.device.send_frame(&frame);
        }
    }

    pub(super) fn on_dhcp(&mut self, payload: &[u8]) {
        let Some(reply) = self.dhcp.handle(payload) else {
            return;
        };
        if reply.is_lease {
            self.counters.dhcp_leases.fetch_add(1, Ordering::Relaxed);
        }
        let (ip, mac) = match reply.to {
            Destination::Broadcast => (Ipv4Addr::BROADCAST, [0xff; 6]),
            Destination::Unicast(ip, mac) => (ip, mac),
        };
        let frame = packet::udp_frame(
            Topology::GATEWAY_MAC,
            mac,
            SocketAddrV4::new(Topology::GATEWAY, 67),
            SocketAddrV4::new(ip, 68),
            &reply.payload,
        );
        self.device.send_frame(&frame);
    }
}
