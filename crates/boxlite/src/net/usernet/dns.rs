//! The usernet DNS forwarder on 192.168.127.1:53 (RFC 1035, EDNS from RFC 6891, TCP from
//! RFC 7766).
//!
//! A guest query is answered locally for `host.boxlite.internal`, and otherwise forwarded as is
//! to the upstream resolvers in order (UDP first, TCP when the upstream truncates). The answer is
//! then fitted to what the guest can take: over UDP at most 512 bytes without EDNS, else the
//! EDNS size the query advertised (capped by what fits in one unfragmented frame); when it does
//! not fit, whole answer records are kept while they fit, the rest dropped and TC set, so the
//! guest retries over TCP. When no upstream answers, the guest gets SERVFAIL, never an empty
//! NOERROR. Queries run on short-lived worker threads (bounded by the caller), since each may
//! wait seconds on an upstream.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{rdata::A, RData, Record, RecordType};
use tracing::debug;

use crate::net::Topology;

/// How long one upstream gets to answer one query.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest UDP reply we send: one unfragmented datagram in a 1500-byte MTU.
pub const MAX_UDP_REPLY: usize = 1500 - 20 - 8;

/// How the query reached us; decides the size limit of the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// Answers one raw query. `None` when the bytes are not even a DNS header (nothing to reply to).
pub fn answer(query: &[u8], upstreams: &[SocketAddr], transport: Transport) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    let id = u16::from_be_bytes([query[0], query[1]]);
    let parsed = match Message::from_vec(query) {
        Ok(m) if m.metadata.message_type == MessageType::Query => m,
        Ok(_) => return None,
        Err(e) => {
            debug!(error = %e, "malformed DNS query");
            return encode(&Message::error_msg(
                id,
                OpCode::Query,
                ResponseCode::FormErr,
            ));
        }
    };

    let full = match local_answer(&parsed) {
        Some(reply) => reply,
        None => match forward(query, id, upstreams) {
            Some(reply) => reply,
            None => servfail(&parsed)?,
        },
    };
    match transport {
        Transport::Tcp => Some(full),
        Transport::Udp => Some(fit_udp(full, &parsed)),
    }
}

/// The reply size a UDP query allows.
pub fn udp_limit(query: &Message) -> usize {
    let advertised = query
        .edns
        .as_ref()
        .map_or(512, |e| usize::from(e.max_payload()));
    advertised.clamp(512, MAX_UDP_REPLY)
}

/// Shrinks a reply to the query's UDP limit, setting TC when records had to go.
pub fn fit_udp(reply: Vec<u8>, query: &Message) -> Vec<u8> {
    let limit = udp_limit(query);
    if reply.len() <= limit {
        return reply;
    }
    let Ok(full) = Message::from_vec(&reply) else {
        return servfail(query).unwrap_or_default();
    };
    let mut cut = full.clone();
    cut.metadata.truncation = true;
    cut.answers.clear();
    cut.authorities.clear();
    cut.additionals.clear();
    cut.signature = None;
    // An OPT in the query asks for one in the reply (RFC 6891 6.1.1).
    cut.edns = query
        .edns
        .as_ref()
        .map(|q| full.edns.clone().unwrap_or_else(|| q.clone()));
    for record in &full.answers {
        cut.answers.push(record.clone());
        if cut.to_vec().map_or(true, |b| b.len() > limit) {
            cut.answers.pop();
            break;
        }
    }
    match cut.to_vec() {
        Ok(bytes) if bytes.len() <= limit => bytes,
        _ => {
            // Even the question does not fit (a giant name): header and flags alone.
            let mut bare = Message::response(full.metadata.id, OpCode::Query);
            bare.metadata = full.metadata;
            bare.metadata.truncation = true;
            encode(&bare).unwrap_or_default()
        }
    }
}

fn local_answer(query: &Message) -> Option<Vec<u8>> {
    let q = query.queries.first()?;
    let name = q.name().to_ascii().to_ascii_lowercase();
    if name.trim_end_matches('.') != Topology::HOST_ALIAS_NAME {
        return None;
    }
    let mut reply = Message::response(query.metadata.id, OpCode::Query);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.metadata.authoritative = true;
    reply.add_query(q.clone());
    if q.query_type() == RecordType::A {
        let a = A(Topology::HOST_ALIAS);
        reply.add_answer(Record::from_rdata(q.name().clone(), 60, RData::A(a)));
    }
    if let Some(edns) = &query.edns {
        reply.set_edns(edns.clone());
    }
    encode(&reply)
}

/// SERVFAIL for `query`, echoing its question.
pub fn servfail(query: &Message) -> Option<Vec<u8>> {
    let mut reply = Message::error_msg(query.metadata.id, OpCode::Query, ResponseCode::ServFail);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_queries(query.queries.iter().cloned());
    encode(&reply)
}

fn encode(msg: &Message) -> Option<Vec<u8>> {
    msg.to_vec().ok()
}

fn forward(query: &[u8], id: u16, upstreams: &[SocketAddr]) -> Option<Vec<u8>> {
    for upstream in upstreams {
        match forward_udp(query, id, *upstream) {
            Some(reply) if truncated(&reply) => {
                if let Some(full) = forward_tcp(query, id, *upstream) {
                    return Some(full);
                }
                return Some(reply);
            }
            Some(reply) => return Some(reply),
            None => {
                if let Some(full) = forward_tcp(query, id, *upstream) {
                    return Some(full);
                }
            }
        }
    }
    None
}

fn truncated(reply: &[u8]) -> bool {
    reply.len() > 2 && reply[2] & 0x02 != 0
}

fn well_formed_reply(reply: &[u8], id: u16) -> bool {
    reply.len() >= 12 && u16::from_be_bytes([reply[0], reply[1]]) == id && reply[2] & 0x80 != 0
}

fn forward_udp(query: &[u8], id: u16, upstream: SocketAddr) -> Option<Vec<u8>> {
    let bind: SocketAddr = if upstream.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        "[::]:0".parse().expect("literal")
    };
    let sock = UdpSocket::bind(bind).ok()?;
    sock.connect(upstream).ok()?;
    sock.set_read_timeout(Some(UPSTREAM_TIMEOUT)).ok()?;
    sock.send(query).ok()?;
    let mut buf = vec![0u8; 65535];
    let deadline = std::time::Instant::now() + UPSTREAM_TIMEOUT;
    while std::time::Instant::now() < deadline {
        let n = sock.recv(&mut buf).ok()?;
        if well_formed_reply(&buf[..n], id) {
            buf.truncate(n);
            return Some(buf);
        }
    }
    None
}

fn forward_tcp(query: &[u8], id: u16, upstream: SocketAddr) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect_timeout(&upstream, UPSTREAM_TIMEOUT).ok()?;
    s.set_read_timeout(Some(UPSTREAM_TIMEOUT)).ok()?;
    s.set_write_timeout(Some(UPSTREAM_TIMEOUT)).ok()?;
    let mut msg = (query.len() as u16).to_be_bytes().to_vec();
    msg.extend_from_slice(query);
    s.write_all(&msg).ok()?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len).ok()?;
    let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut reply).ok()?;
    well_formed_reply(&reply, id).then_some(reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns, Query};
    use hickory_proto::rr::Name;

    fn query(name: &str, edns: Option<u16>) -> Message {
        let mut m = Message::new(0x4242, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            m.set_edns(e);
        }
        m
    }

    fn many_a_reply(q: &Message, n: u8) -> Vec<u8> {
        let mut r = Message::response(q.metadata.id, OpCode::Query);
        r.add_queries(q.queries.clone());
        for i in 0..n {
            let rd = RData::A(A(Ipv4Addr::new(198, 51, 100, i)));
            r.add_answer(Record::from_rdata(q.queries[0].name().clone(), 60, rd));
        }
        r.to_vec().unwrap()
    }

    #[test]
    fn host_alias_answers_locally() {
        let q = query("host.boxlite.internal.", None).to_vec().unwrap();
        let r = Message::from_vec(&answer(&q, &[], Transport::Udp).unwrap()).unwrap();
        assert_eq!(r.metadata.id, 0x4242);
        assert_eq!(r.answers.len(), 1);
        assert_eq!(r.answers[0].data, RData::A(A(Topology::HOST_ALIAS)));
    }

    #[test]
    fn no_upstream_gives_servfail() {
        let q = query("example.test.", None).to_vec().unwrap();
        let r = Message::from_vec(&answer(&q, &[], Transport::Udp).unwrap()).unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
    }

    #[test]
    fn oversized_replies_are_cut_to_whole_records_with_tc() {
        for (edns, limit) in [
            (None, 512),
            (Some(512), 512),
            (Some(1232), 1232),
            (Some(9000), 1472),
        ] {
            let q = query("many.example.test.", edns);
            let full = many_a_reply(&q, 120);
            let cut = fit_udp(full, &q);
            assert!(cut.len() <= limit, "{} > {limit}", cut.len());
            let m = Message::from_vec(&cut).unwrap();
            assert!(m.metadata.truncation);
            assert!(!m.answers.is_empty() && m.answers.len() < 120);
            assert_eq!(m.edns.is_some(), edns.is_some());
        }
        let q = query("small.example.test.", None);
        let small = many_a_reply(&q, 1);
        assert_eq!(fit_udp(small.clone(), &q), small, "what fits is untouched");
    }

    #[test]
    fn garbage_queries_get_formerr_or_nothing() {
        assert_eq!(answer(&[1, 2, 3], &[], Transport::Udp), None);
        let mut junk = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        junk.extend_from_slice(&[63, b'a']);
        let r = Message::from_vec(&answer(&junk, &[], Transport::Udp).unwrap()).unwrap();
        assert_eq!(r.metadata.id, 0x1234);
        assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    }
}
