//! Test support: a scripted HTTP server on 127.0.0.1 for registry behaviour no real registry
//! shows (lying digests, odd token responses, foreign-layer hosts, stalled bodies). A handler
//! closure answers each request; every request is logged with its headers. Each request runs
//! on its own thread, so a stalled body does not hold up others.
//!
//! Use with `#[path = "support/scripted.rs"] mod scripted;`.
#![allow(dead_code)]

use std::io::Read;
use std::sync::{Arc, Mutex};

/// A request as the server saw it.
#[derive(Debug, Clone)]
pub struct Logged {
    pub method: String,
    /// Path and query.
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Logged {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The path without the query.
    pub fn path(&self) -> &str {
        self.url.split('?').next().unwrap_or(&self.url)
    }
}

/// An answer.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Box<dyn Read + Send>,
    pub length: Option<usize>,
}

impl Reply {
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Reply {
        let body = body.into();
        Reply {
            status,
            headers: Vec::new(),
            length: Some(body.len()),
            body: Box::new(std::io::Cursor::new(body)),
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// A body that is streamed from `reader` (length announced when known).
    pub fn stream(status: u16, reader: Box<dyn Read + Send>, length: Option<usize>) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: reader,
            length,
        }
    }
}

type Handler = dyn Fn(&Logged) -> Reply + Send + Sync;

/// A running scripted server; stops when dropped.
pub struct Scripted {
    server: Arc<tiny_http::Server>,
    port: u16,
    log: Arc<Mutex<Vec<Logged>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Scripted {
    pub fn start(handler: impl Fn(&Logged) -> Reply + Send + Sync + 'static) -> Scripted {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
        let port = server.server_addr().to_ip().unwrap().port();
        let log = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let thread = {
            let server = server.clone();
            let log = log.clone();
            std::thread::spawn(move || {
                for mut req in server.incoming_requests() {
                    let mut body = Vec::new();
                    let _ = req.as_reader().read_to_end(&mut body);
                    let logged = Logged {
                        body,
                        method: req.method().to_string(),
                        url: req.url().to_string(),
                        headers: req
                            .headers()
                            .iter()
                            .map(|h| (h.field.as_str().to_string(), h.value.as_str().to_string()))
                            .collect(),
                    };
                    log.lock().unwrap().push(logged.clone());
                    let handler = handler.clone();
                    std::thread::spawn(move || {
                        let reply = handler(&logged);
                        let headers = reply
                            .headers
                            .iter()
                            .map(|(k, v)| {
                                tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()).unwrap()
                            })
                            .collect();
                        let response = tiny_http::Response::new(
                            tiny_http::StatusCode(reply.status),
                            headers,
                            reply.body,
                            reply.length,
                            None,
                        );
                        let _ = req.respond(response);
                    });
                }
            })
        };
        Scripted {
            server,
            port,
            log,
            thread: Some(thread),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> Vec<Logged> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A small valid image: (manifest, config, gzip layer) with one file `hello.txt`.
pub fn tiny_image(text: &str) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    use sha2::{Digest as _, Sha256};
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_ustar();
    header.set_size(text.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(1_700_000_000);
    header.set_cksum();
    tar.append_data(&mut header, "hello.txt", text.as_bytes())
        .unwrap();
    let raw = tar.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &raw).unwrap();
    let layer = gz.finish().unwrap();
    let dig = |b: &[u8]| format!("sha256:{}", hex::encode(Sha256::digest(b)));
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/hello"]},
        "rootfs": {"type": "layers", "diff_ids": [dig(&raw)]},
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": dig(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": dig(&layer), "size": layer.len()}],
    }))
    .unwrap();
    (manifest, config, layer)
}

/// `sha256:<hex>` of `bytes`.
pub fn digest_of(bytes: &[u8]) -> String {
    use sha2::{Digest as _, Sha256};
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}
