//! `boxlite pull`, `images`, `image import|unpack|rm|prune`, `login`, `logout`: the image
//! commands of the CLI contract, over [`ImageManager`].

use std::io::{IsTerminal, Read};
use std::path::PathBuf;

use anyhow::Context;
use boxlite::home::Home;
use boxlite::images::digest::Digest;
use boxlite::images::manager::{ImageManager, PruneReport};
use boxlite::images::manifest::Platform;
use boxlite::images::pull::PullOptions;
use boxlite::images::registry::Credential;
use clap::Subcommand;

use crate::table::Table;

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Pull an image from a registry.
    Pull {
        reference: String,
        /// No progress output; print only the image id.
        #[arg(long, short)]
        quiet: bool,
        /// Platform to pick from a multi-platform image (os/arch[/variant]).
        #[arg(long, default_value = "linux/amd64")]
        platform: String,
        /// Reach this registry (host[:port]) over plain HTTP. Repeatable.
        #[arg(long = "insecure-registry", value_name = "HOST")]
        insecure_registries: Vec<String>,
    },
    /// List images.
    Images {
        /// One JSON array of image records.
        #[arg(long)]
        json: bool,
    },
    /// Manage images.
    Image {
        #[command(subcommand)]
        command: ImageSubcommand,
    },
    /// Store credentials for a registry (checked against it first).
    Login {
        registry: String,
        #[arg(long, short)]
        username: String,
        /// Read the password from standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Forget the stored credentials of a registry.
    Logout { registry: String },
}

#[derive(Subcommand, Debug)]
pub enum ImageSubcommand {
    /// Import an OCI layout directory, an oci-archive tar or a `docker save` tar.
    Import {
        path: PathBuf,
        /// Name for the image (replaces names in the archive).
        #[arg(long)]
        tag: Option<String>,
    },
    /// Write an image's root filesystem into a plain directory.
    Unpack { reference: String, dir: PathBuf },
    /// Remove image references; an image goes when no reference is left.
    Rm {
        #[arg(required = true)]
        references: Vec<String>,
        /// Given an image id, remove the image even when several references name it.
        #[arg(short, long)]
        force: bool,
    },
    /// Remove unnamed images and everything no image needs.
    Prune,
    /// List images (same as `boxlite images`).
    Ls {
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: ImageCommand) -> anyhow::Result<u8> {
    let home = Home::from_env().context("opening the boxlite home folder")?;
    let images = ImageManager::new(&home).context("opening the image store")?;
    match cmd {
        ImageCommand::Pull {
            reference,
            quiet,
            platform,
            insecure_registries,
        } => pull(&images, &reference, quiet, &platform, insecure_registries),
        ImageCommand::Images { json } => list(&images, json),
        ImageCommand::Image { command } => match command {
            ImageSubcommand::Import { path, tag } => {
                let record = images
                    .import(&path, tag.as_deref())
                    .with_context(|| format!("importing {}", path.display()))?;
                outln!("{}", record.id);
                Ok(0)
            }
            ImageSubcommand::Unpack { reference, dir } => {
                images
                    .unpack(&reference, &dir)
                    .with_context(|| format!("unpacking {reference} into {}", dir.display()))?;
                Ok(0)
            }
            ImageSubcommand::Rm { references, force } => {
                let in_use = images_in_use(&home, &images)?;
                for reference in references {
                    let report = images
                        .remove_with(&reference, &in_use, force)
                        .with_context(|| format!("removing {reference}"))?;
                    for name in &report.untagged {
                        outln!("Untagged: {name}");
                    }
                    print_removed(&report);
                }
                Ok(0)
            }
            ImageSubcommand::Prune => {
                let in_use = images_in_use(&home, &images)?;
                let report = images.prune(&in_use).context("pruning images")?;
                print_removed(&report);
                let runtime = boxlite::runtime::Runtime::new(home.clone())?;
                let disks = runtime.prune_disks().context("pruning unused disks")?;
                for (path, _) in &disks {
                    outln!("Deleted: {}", path.display());
                }
                let disk_bytes: u64 = disks.iter().map(|(_, bytes)| bytes).sum();
                outln!(
                    "Removed {} blobs, {} layers and {} disks, freed {}",
                    report.blobs_removed,
                    report.layers_removed,
                    disks.len(),
                    human_size(report.bytes_freed + disk_bytes)
                );
                Ok(0)
            }
            ImageSubcommand::Ls { json } => list(&images, json),
        },
        ImageCommand::Login {
            registry,
            username,
            password_stdin,
        } => {
            if !password_stdin {
                anyhow::bail!("give the password on standard input with --password-stdin");
            }
            let mut password = String::new();
            std::io::stdin()
                .read_to_string(&mut password)
                .context("reading the password from standard input")?;
            let password = password.trim_end_matches(['\n', '\r']);
            if password.is_empty() {
                anyhow::bail!("the password on standard input is empty");
            }
            images
                .login(&registry, Credential::new(username, password))
                .with_context(|| format!("logging in to {registry}"))?;
            outln!("Login Succeeded");
            Ok(0)
        }
        ImageCommand::Logout { registry } => {
            if images.logout(&registry)? {
                outln!("Removed login credentials for {registry}");
            } else {
                outln!("Not logged in to {registry}");
            }
            Ok(0)
        }
    }
}

fn pull(
    images: &ImageManager,
    reference: &str,
    quiet: bool,
    platform: &str,
    insecure_registries: Vec<String>,
) -> anyhow::Result<u8> {
    let platform = Platform::parse(platform)
        .with_context(|| format!("platform {platform:?} is not os/arch[/variant]"))?;
    let options = PullOptions {
        platform: Some(platform),
        quiet,
        insecure_registries,
    };
    let (record, report) = images.pull_with_report(reference, &options)?;
    for warning in &report.warnings {
        eprintln!("warning: {warning}");
    }
    if !quiet && std::io::stderr().is_terminal() {
        eprintln!(
            "Pulled {reference}: {} blobs downloaded ({}), {} already present",
            report.blobs_downloaded,
            human_size(report.bytes_downloaded),
            report.blobs_present
        );
    }
    outln!("{}", record.id);
    Ok(0)
}

fn list(images: &ImageManager, json: bool) -> anyhow::Result<u8> {
    let records = images.list()?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&records)?);
        return Ok(0);
    }
    let mut table = Table::new(&["REFERENCE", "IMAGE ID", "SIZE"]).right(2);
    for record in &records {
        let id = &record.id.hex()[..12];
        let size = human_size(record.size);
        if record.references.is_empty() {
            table.row(["<none>", id, &size]);
        }
        for reference in &record.references {
            table.row([reference.as_str(), id, &size]);
        }
    }
    table.print();
    Ok(0)
}

/// Ids of the images that Boxes were created from; such images are never removed.
fn images_in_use(home: &Home, _images: &ImageManager) -> anyhow::Result<Vec<Digest>> {
    let runtime = boxlite::runtime::Runtime::new(home.clone())?;
    Ok(runtime.images_in_use()?)
}

fn print_removed(report: &PruneReport) {
    for id in &report.images_removed {
        outln!("Deleted: {id}");
    }
}

fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
