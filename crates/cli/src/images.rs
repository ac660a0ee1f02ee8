//! `boxlite pull`, `images`, `image …`, `login`, `logout`. (Owned by the registry work.)

use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Pull an image from a registry.
    Pull { reference: String },
}

pub fn run(cmd: ImageCommand) -> anyhow::Result<u8> {
    match cmd {
        ImageCommand::Pull { reference } => anyhow::bail!("pull {reference}: not implemented yet"),
    }
}
