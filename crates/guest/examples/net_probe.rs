//! Test aid: runs the agent's DHCP client once as a plain program, so the network tests can
//! check it against every backend inside a real guest. Usage: `dhcp_probe MAC [TIMEOUT_SECS]`;
//! prints `lease IP` on success.

#[path = "../src/dhcp.rs"]
mod dhcp;

fn main() {
    let mut args = std::env::args().skip(1);
    let mac = args.next().unwrap_or_else(|| "52:54:00:12:34:56".into());
    let timeout = args.next().and_then(|t| t.parse().ok()).unwrap_or(20);
    let setup = boxlite_protocol::NetworkSetup {
        mac,
        dhcp_timeout_secs: timeout,
    };
    match dhcp::configure(&setup) {
        Ok(ip) => println!("lease {}", ip.unwrap_or_default()),
        Err(e) => {
            eprintln!("dhcp_probe: {e}");
            std::process::exit(1);
        }
    }
}
