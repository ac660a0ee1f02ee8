//! The guest agent, PID 1 of every Box. See the module docs for each step.

#[allow(dead_code)] // called by the agent's network step
mod dhcp;

fn main() {
    eprintln!("boxlite-guest: not yet implemented");
}
