//! Host → guest port forwards: listening host sockets, connections into the guest from a
//! gateway port, and UDP peers mapped to gateway ports so the guest's replies find their way.

use super::*;

impl Stack {
    pub fn add_forward(&mut self, mut f: PortForward) -> Result<PortForward> {
        let asked = f;
        let bind_err = move |source| NetworkError::BindForward {
            forward: asked,
            source,
        };
        let token = self.token();
        match f.protocol {
            Protocol::Tcp => {
                let mut l = TcpListener::bind(f.host_addr()).map_err(bind_err)?;
                f.host_port = l.local_addr().map_err(bind_err)?.port();
                self.poll
                    .registry()
                    .register(&mut l, token, Interest::READABLE)
                    .map_err(bind_err)?;
                self.tcp_forwards.insert(token, (f, l));
            }
            Protocol::Udp => {
                let mut s = UdpSocket::bind(f.host_addr()).map_err(bind_err)?;
                f.host_port = s.local_addr().map_err(bind_err)?.port();
                self.poll
                    .registry()
                    .register(&mut s, token, Interest::READABLE)
                    .map_err(bind_err)?;
                self.udp_forwards.insert(
                    token,
                    UdpForward {
                        forward: f,
                        socket: s,
                        peers: HashMap::new(),
                    },
                );
            }
        }
        info!(forward = %f, "port forward added");
        self.forward_list.lock().expect("forward list lock").push(f);
        Ok(f)
    }

    pub(super) fn remove_forward(&mut self, f: &PortForward) -> Result<()> {
        let tcp = self
            .tcp_forwards
            .iter()
            .find(|(_, (g, _))| g == f)
            .map(|(t, _)| *t);
        let udp = self
            .udp_forwards
            .iter()
            .find(|(_, g)| g.forward == *f)
            .map(|(t, _)| *t);
        if let Some(t) = tcp {
            if let Some((_, mut l)) = self.tcp_forwards.remove(&t) {
                let _ = self.poll.registry().deregister(&mut l);
            }
        } else if let Some(t) = udp {
            if let Some(mut u) = self.udp_forwards.remove(&t) {
                let _ = self.poll.registry().deregister(&mut u.socket);
            }
            self.udp_forward_ports.retain(|_, (tok, _)| *tok != t);
        } else {
            return Err(NetworkError::NoSuchForward { forward: *f });
        }
        info!(forward = %f, "port forward removed");
        self.forward_list
            .lock()
            .expect("forward list lock")
            .retain(|g| g != f);
        Ok(())
    }

    pub(super) fn gateway_port(&mut self) -> u16 {
        loop {
            self.next_gw_port = if self.next_gw_port >= 60999 {
                20000
            } else {
                self.next_gw_port + 1
            };
            let p = self.next_gw_port;
            let gw = SocketAddrV4::new(Topology::GATEWAY, p);
            let used = self.udp_forward_ports.contains_key(&p)
                || self.tcp_by_tuple.keys().any(|(_, remote)| *remote == gw);
            if !used {
                return p;
            }
        }
    }

    pub(super) fn accept_forward(&mut self, token: Token) {
        loop {
            let Some((f, listener)) = self.tcp_forwards.get(&token) else {
                return;
            };
            let f = *f;
            let (mut stream, peer) = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    debug!(error = %e, "accept on a port forward failed");
                    return;
                }
            };
            if self.qemu.is_none() || self.tcp.len() >= MAX_TCP {
                continue; // dropping the stream closes it: nobody to forward to
            }
            let gw = SocketAddrV4::new(Topology::GATEWAY, self.gateway_port());
            let guest = SocketAddrV4::new(Topology::GUEST, f.guest_port);
            let mut sock = Self::new_socket();
            if sock
                .connect(
                    self.iface.context(),
                    (IpAddress::Ipv4(*guest.ip()), guest.port()),
                    gw.port(),
                )
                .is_err()
            {
                continue;
            }
            let handle = self.sockets.add(sock);
            let t = self.token();
            if self
                .poll
                .registry()
                .register(&mut stream, t, Interest::READABLE | Interest::WRITABLE)
                .is_err()
            {
                self.sockets.remove(handle);
                continue;
            }
            debug!(%peer, forward = %f, "forwarding a host connection");
            let mut conn = TcpConn::host((guest, gw), stream, None);
            conn.handle = Some(handle);
            self.add_tcp(t, conn);
        }
    }

    pub(super) fn read_udp_forward(&mut self, token: Token) {
        let mut buf = [0u8; 65536];
        let mut datagrams = Vec::new();
        loop {
            let Some(fwd) = self.udp_forwards.get_mut(&token) else {
                return;
            };
            match fwd.socket.recv_from(&mut buf) {
                Ok((n, peer)) => datagrams.push((peer, buf[..n].to_vec())),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
            if datagrams.len() >= 64 {
                self.pending_reads.push(token);
                break;
            }
        }
        for (peer, d) in datagrams {
            let known = self
                .udp_forwards
                .get(&token)
                .and_then(|f| f.peers.get(&peer).map(|p| p.0));
            let port = match known {
                Some(p) => p,
                None => {
                    let p = self.gateway_port();
                    self.udp_forward_ports.insert(p, (token, peer));
                    p
                }
            };
            let Some(fwd) = self.udp_forwards.get_mut(&token) else {
                return;
            };
            fwd.peers.insert(peer, (port, Instant::now()));
            let guest = SocketAddrV4::new(Topology::GUEST, fwd.forward.guest_port);
            self.send_udp_to_guest(SocketAddrV4::new(Topology::GATEWAY, port), guest, &d);
        }
    }
}
