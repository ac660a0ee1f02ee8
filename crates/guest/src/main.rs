//! The guest agent, PID 1 of every Box. See the module docs for each step.

fn main() {
    eprintln!("boxlite-guest: not yet implemented");
}
