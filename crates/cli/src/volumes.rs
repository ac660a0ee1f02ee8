//! `boxlite volume …`. (Owned by the disks and volumes work.)

use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum VolumeCommand {
    /// List volumes.
    Ls,
}

pub fn run(cmd: VolumeCommand) -> anyhow::Result<u8> {
    match cmd {
        VolumeCommand::Ls => anyhow::bail!("volume ls: not implemented yet"),
    }
}
