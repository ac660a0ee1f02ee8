//! Box lifecycle commands: `run`, `create`, `start`, `stop`, `rm`, `ls`, `inspect`, `exec`.

use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum BoxCommand {
    /// List Boxes.
    Ls,
}

pub fn run(cmd: BoxCommand) -> anyhow::Result<u8> {
    match cmd {
        BoxCommand::Ls => anyhow::bail!("ls: not implemented yet"),
    }
}
