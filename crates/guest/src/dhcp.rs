//! DHCP client of the guest (RFC 2131). Placeholder until the network helper's client lands.

/// Configures the Box's NIC by DHCP; returns the leased address.
pub fn configure(setup: &boxlite_protocol::NetworkSetup) -> Result<Option<String>, String> {
    let _ = setup;
    Err("DHCP client not built yet".into())
}
