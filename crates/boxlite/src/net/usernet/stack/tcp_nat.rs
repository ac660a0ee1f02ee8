//! Guest TCP: held SYNs, host connects, smoltcp sockets per connection and the pump that moves
//! their data (the `usernet::tcp` module).

use super::*;

impl Stack {
    pub(super) fn on_guest_syn(&mut self, frame: &[u8], seg: SegmentId) {
        if self.tcp.len() >= MAX_TCP {
            warn!(dst = %seg.dst, "too many TCP connections; refusing");
            return self.refuse(&seg);
        }
        let tuple = (seg.src, seg.dst);
        match policy::target(seg.dst, self.config.allow_host) {
            Target::Refuse => self.refuse(&seg),
            Target::Dns => {
                let token = self.token();
                self.add_tcp(token, TcpConn::dns(tuple));
                self.attach_syn(token, frame.to_vec());
            }
            Target::Host(addr) => {
                let mut stream = match TcpStream::connect(SocketAddr::V4(addr)) {
                    Ok(s) => s,
                    Err(e) => {
                        debug!(dst = %addr, error = %e, "host connect failed");
                        return self.refuse(&seg);
                    }
                };
                let token = self.token();
                if self
                    .poll
                    .registry()
                    .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                    .is_err()
                {
                    return self.refuse(&seg);
                }
                self.add_tcp(token, TcpConn::host(tuple, stream, Some(frame.to_vec())));
            }
        }
    }

    pub(super) fn add_tcp(&mut self, token: Token, conn: TcpConn) {
        self.tcp_by_tuple.insert(conn.tuple, token);
        self.tcp.insert(token, conn);
        self.counters
            .tcp_connections
            .fetch_add(1, Ordering::Relaxed);
        self.counters
            .tcp_connections_total
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn new_socket() -> tcp::Socket<'static> {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
        );
        s.set_nagle_enabled(false);
        // Acknowledge at once: a delayed ACK here adds to every request/response round trip.
        s.set_ack_delay(None);
        s.set_timeout(Some(smoltcp::time::Duration::from_secs(120)));
        s
    }

    pub(super) fn listen(&mut self, at: SocketAddrV4) -> smoltcp::iface::SocketHandle {
        let mut s = Self::new_socket();
        s.listen(IpListenEndpoint {
            addr: Some((*at.ip()).into()),
            port: at.port(),
        })
        .expect("listening on a non-zero port succeeds");
        self.sockets.add(s)
    }

    /// A host connect finished (or failed): replay the SYN into a fresh socket, or reset.
    pub(super) fn finish_connect(&mut self, token: Token) {
        let Some(conn) = self.tcp.get_mut(&token) else {
            return;
        };
        let Peer::Host {
            stream,
            connected,
            syn,
            ..
        } = &mut conn.peer
        else {
            return;
        };
        if *connected {
            return;
        }
        let failed = match stream.take_error() {
            Ok(Some(_)) | Err(_) => true,
            Ok(None) => match stream.peer_addr() {
                Ok(_) => false,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(_) => true,
            },
        };
        let syn = syn.take().unwrap_or_default();
        if failed {
            let seg = syn_segment(&syn);
            self.remove_tcp(token);
            if let Some(seg) = seg {
                self.refuse(&seg);
            }
            return;
        }
        *connected = true;
        conn.host_readable = true;
        conn.host_writable = true;
        self.attach_syn(token, syn);
    }

    /// Gives connection `token` a socket listening on exactly its destination and feeds it the
    /// guest's SYN at once, so no other listener for the same destination can take that SYN.
    pub(super) fn attach_syn(&mut self, token: Token, syn: Vec<u8>) {
        let Some(dst) = self.tcp.get(&token).map(|c| c.tuple.1) else {
            return;
        };
        let handle = self.listen(dst);
        if let Some(conn) = self.tcp.get_mut(&token) {
            conn.handle = Some(handle);
        }
        self.device.rx.push_front(syn.clone());
        let now = self.smol_now();
        self.iface.poll(now, &mut self.device, &mut self.sockets);
        if self.sockets.get::<tcp::Socket>(handle).state() == tcp::State::Listen {
            debug!(dst = %dst, "the guest SYN was not taken; refusing");
            self.remove_tcp(token);
            if let Some(seg) = syn_segment(&syn) {
                self.refuse(&seg);
            }
        }
    }

    pub(super) fn remove_tcp(&mut self, token: Token) {
        if let Some(mut conn) = self.tcp.remove(&token) {
            self.tcp_by_tuple.remove(&conn.tuple);
            if let Some(h) = conn.handle {
                self.sockets.remove(h);
            }
            let graceful = conn.closed_gracefully();
            if let Peer::Host { stream, .. } = &mut conn.peer {
                let _ = self.poll.registry().deregister(stream);
                if !graceful {
                    // The guest reset (or vanished): reset the host side too, not a FIN.
                    let _ = nix::sys::socket::setsockopt(
                        &*stream,
                        nix::sys::socket::sockopt::Linger,
                        &libc::linger {
                            l_onoff: 1,
                            l_linger: 0,
                        },
                    );
                }
            }
            self.counters
                .tcp_connections
                .fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub(super) fn pump_connections(&mut self) {
        let mut done = Vec::new();
        let mut dns_queries = Vec::new();
        for (token, conn) in self.tcp.iter_mut() {
            let Some(handle) = conn.handle else {
                continue;
            };
            let sock = self.sockets.get_mut::<tcp::Socket>(handle);
            let mut queries = Vec::new();
            if conn.pump(sock, &mut queries) == Pumped::Done {
                done.push(*token);
            }
            for q in queries {
                dns_queries.push((*token, q));
            }
        }
        for t in done {
            self.remove_tcp(t);
        }
        for (token, q) in dns_queries {
            self.spawn_dns(q, DnsReturn::Tcp { token }, Transport::Tcp);
        }
    }
}

/// The TCP fields of a SYN frame we queued ourselves (it parsed once already).
pub(super) fn syn_segment(frame: &[u8]) -> Option<SegmentId> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
    Some(SegmentId {
        src: SocketAddrV4::new(ip.src_addr(), tcp.src_port()),
        dst: SocketAddrV4::new(ip.dst_addr(), tcp.dst_port()),
        seq: tcp.seq_number().0 as u32,
        ack: None,
        syn: true,
        fin: false,
        payload_len: tcp.payload().len(),
    })
}
