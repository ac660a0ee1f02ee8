//! The runtime: the home folder, the state database and the lifecycle of Boxes.
//!
//! ```no_run
//! use boxlite::runtime::{Runtime, config::BoxOptions};
//!
//! let rt = Runtime::from_env()?;
//! let mut opts = BoxOptions::new("localhost:5000/busybox:latest");
//! opts.idle = true; // no main process: the Box runs until stopped
//! let mut bx = rt.create(opts)?;
//! bx.start(false)?;
//! let out = bx.exec_output(&["echo", "hello"])?;
//! assert_eq!(out.stdout, b"hello\n");
//! bx.stop(std::time::Duration::from_secs(10))?;
//! # Ok::<(), boxlite::runtime::RuntimeError>(())
//! ```

pub mod config;
pub mod image;
pub mod paths;
pub mod record;
pub mod usage;

use crate::home::Home;
use crate::litebox::LiteBox;
use crate::rootfs::disk::BoxDisk;
use crate::state::Db;
use crate::vmm::VmmError;
use crate::volumes::{VolumeError, Volumes};
use config::{BoxConfig, BoxOptions, RootfsSource};
use paths::BoxPaths;
use record::{BoxRecord, BoxState};

/// Errors of Box lifecycle operations.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("no such box: {0}")]
    BoxNotFound(String),
    #[error("the name {0:?} is already in use by another box")]
    NameInUse(String),
    #[error("invalid box name {0:?}: use letters, digits, '_', '.' and '-', starting with a letter or digit")]
    InvalidName(String),
    #[error("box {name} is {state}: cannot {operation}")]
    InvalidState {
        name: String,
        state: BoxState,
        operation: &'static str,
    },
    #[error("image {reference}")]
    Image {
        reference: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("disk of box {name}: {message}")]
    Disk { name: String, message: String },
    #[error("box {name} failed to start: {message}")]
    Start { name: String, message: String },
    #[error("box {name}: {message}")]
    Shim { name: String, message: String },
    #[error("state database")]
    Db(#[from] rusqlite::Error),
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Volume(Box<VolumeError>),
}

pub type Result<T> = std::result::Result<T, RuntimeError>;

fn volume_err(e: VolumeError) -> RuntimeError {
    RuntimeError::Volume(Box::new(e))
}

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> RuntimeError {
    let context = context.into();
    move |source| RuntimeError::Io { context, source }
}

/// The entry point of the library: one home folder and the Boxes in it.
#[derive(Debug, Clone)]
pub struct Runtime {
    home: Home,
}

impl Runtime {
    /// The runtime of `BOXLITE_HOME` (default `~/.boxlite`).
    pub fn from_env() -> Result<Runtime> {
        Runtime::new(Home::from_env().map_err(io_err("cannot open the home folder"))?)
    }

    pub fn new(home: Home) -> Result<Runtime> {
        Db::open(&home)?;
        Ok(Runtime { home })
    }

    pub fn home(&self) -> &Home {
        &self.home
    }

    pub(crate) fn db(&self) -> Result<Db> {
        Ok(Db::open(&self.home)?)
    }

    /// Creates a Box (its disk and its record); it does not start it.
    pub fn create(&self, opts: BoxOptions) -> Result<LiteBox> {
        if let Some(name) = &opts.name {
            validate_name(name)?;
        }
        if opts.cpus == 0 || opts.memory_mib < 64 {
            return Err(RuntimeError::Invalid(format!(
                "invalid resources: --cpus {} --memory {} (at least 1 CPU and 64 MiB)",
                opts.cpus, opts.memory_mib
            )));
        }
        check_host_resources(opts.cpus, opts.memory_mib)?;
        config::validate_mounts(&opts.mounts).map_err(RuntimeError::Invalid)?;
        validate_network(&opts)?;
        let id = new_id();
        let name = opts.name.clone().unwrap_or_else(|| id[..12].to_string());
        let db = self.db()?;
        if BoxRecord::find(&db, &name)?.is_some() {
            return Err(RuntimeError::NameInUse(name));
        }
        let resolved = image::resolve(&self.home, &opts)?;
        check_disk_size(opts.disk_size, resolved.base.size, &resolved.source)?;
        let (rootfs, defaults) = (resolved.source, resolved.defaults);
        let created_volumes = self.ensure_volumes(&opts.mounts)?;
        let paths = BoxPaths::new(&self.home, &id);
        let cleanup = |e: RuntimeError| {
            let _ = std::fs::remove_dir_all(&paths.dir);
            self.remove_volumes(&created_volumes);
            e
        };
        BoxDisk::create(
            &self.home,
            &id,
            &resolved.base.path,
            resolved.base.format,
            Some(opts.disk_size),
        )
        .map_err(|e| {
            cleanup(RuntimeError::Disk {
                name: name.clone(),
                message: e.to_string(),
            })
        })?;
        let main = config::main_process(&defaults, &opts, &name);
        let exec_defaults = config::ProcessSpec {
            argv: vec![],
            env: main.env.clone(),
            cwd: main.cwd.clone(),
            user: main.user.clone(),
            tty: false,
        };
        let record = BoxRecord {
            id: id.clone(),
            name: name.clone(),
            image: match &rootfs {
                RootfsSource::Image { reference, .. } => reference.clone(),
                RootfsSource::Dir { path } => path.clone(),
            },
            created_at: record::now(),
            config: BoxConfig {
                rootfs,
                main,
                exec_defaults,
                cpus: opts.cpus,
                memory_mib: opts.memory_mib,
                disk_size: opts.disk_size,
                mounts: opts.mounts.clone(),
                ports: opts.ports.clone(),
                network: opts.network,
                dns: opts.dns.clone(),
                allow_host: opts.allow_host,
                auto_remove: opts.auto_remove,
                accel: opts.accel,
                mac: mac_for(&id),
                cloned_from: None,
            },
            state: BoxState::Created,
            shim_pid: None,
            vmm_pid: None,
            exit_reason: None,
            exit_code: None,
            started_at: None,
            finished_at: None,
        };
        match record.insert(&db) {
            Ok(()) => Ok(LiteBox::new(self.clone(), record)),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(cleanup(RuntimeError::NameInUse(name)))
            }
            Err(e) => Err(cleanup(e.into())),
        }
    }

    /// Makes sure every named volume in `mounts` exists. As with `docker run -v NAME:/path`, a
    /// missing volume attached read-write is created (empty, default size; the guest formats
    /// it on first use); one attached read-only could never be formatted, so it must exist.
    /// Returns the volumes created here.
    fn ensure_volumes(&self, mounts: &[config::MountConfig]) -> Result<Vec<String>> {
        let mut created = Vec::new();
        let mut store = None;
        for mount in mounts {
            let config::MountConfig::Volume { name, readonly, .. } = mount else {
                continue;
            };
            if store.is_none() {
                store = Some(Volumes::open(&self.home).map_err(volume_err)?);
            }
            let volumes = store.as_mut().expect("opened above");
            match volumes.get(name) {
                Ok(_) => continue,
                Err(VolumeError::NotFound(_)) if *readonly => {
                    self.remove_volumes(&created);
                    return Err(RuntimeError::Invalid(format!(
                        "no volume named {name}: a volume attached read-only must exist \
                         (create it with `boxlite volume create {name}`)"
                    )));
                }
                Err(VolumeError::NotFound(_)) => {}
                Err(e) => {
                    self.remove_volumes(&created);
                    return Err(volume_err(e));
                }
            }
            match volumes.create(name, None, None) {
                Ok(_) => {
                    tracing::info!(volume = %name, "created volume for the box");
                    created.push(name.clone());
                }
                // Another Box created it at the same moment: it exists, which is all we need.
                Err(VolumeError::Exists(_)) => {}
                Err(e) => {
                    self.remove_volumes(&created);
                    return Err(volume_err(e));
                }
            }
        }
        Ok(created)
    }

    /// Removes volumes [`Self::ensure_volumes`] created for a Box whose creation failed.
    fn remove_volumes(&self, names: &[String]) {
        if names.is_empty() {
            return;
        }
        if let Ok(mut volumes) = Volumes::open(&self.home) {
            for name in names {
                if let Err(e) = volumes.remove(name) {
                    tracing::warn!(volume = %name, "removing a volume created for a failed box: {e}");
                }
            }
        }
    }

    /// The Box named `key` (name, id or unique id prefix), its state reconciled with reality.
    pub fn get(&self, key: &str) -> Result<LiteBox> {
        let db = self.db()?;
        let record =
            BoxRecord::find(&db, key)?.ok_or_else(|| RuntimeError::BoxNotFound(key.into()))?;
        Ok(LiteBox::new(self.clone(), record.reconcile(&db)?))
    }

    /// Every Box, oldest first, states reconciled.
    pub fn list(&self) -> Result<Vec<BoxRecord>> {
        let db = self.db()?;
        BoxRecord::list(&db)?
            .into_iter()
            .map(|r| Ok(r.reconcile(&db)?))
            .collect()
    }

    /// Ids of the images that Boxes were created from: never removed by `image rm`/`prune`.
    pub fn images_in_use(&self) -> Result<Vec<crate::images::digest::Digest>> {
        let db = self.db()?;
        Ok(BoxRecord::list(&db)?
            .into_iter()
            .filter_map(|b| match b.config.rootfs {
                RootfsSource::Image { image_id, .. } => image_id.parse().ok(),
                RootfsSource::Dir { .. } => None,
            })
            .collect())
    }

    /// Removes a Box; a running one only with `force` (it is killed first).
    pub fn remove(&self, key: &str, force: bool) -> Result<()> {
        self.get(key)?.remove(force)
    }
}

/// Refuses more CPUs or memory than the host has: QEMU would fail to boot (memory) or crawl for
/// minutes under TCG (CPUs). A host whose size cannot be read is not limited.
fn check_host_resources(cpus: u32, memory_mib: u32) -> Result<()> {
    if let Ok(host_cpus) = std::thread::available_parallelism() {
        if cpus as usize > host_cpus.get() {
            return Err(RuntimeError::Invalid(format!(
                "invalid --cpus {cpus}: the host has {host_cpus} CPUs (at most {host_cpus})"
            )));
        }
    }
    if let Some(host_mib) = host_memory_mib() {
        if u64::from(memory_mib) > host_mib {
            return Err(RuntimeError::Invalid(format!(
                "invalid --memory {memory_mib} MiB: the host has {host_mib} MiB of memory \
                 (at most {host_mib} MiB)"
            )));
        }
    }
    Ok(())
}

/// `MemTotal` of `/proc/meminfo`, in MiB.
fn host_memory_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib >> 10)
}

/// Refuses a disk smaller than the base filesystem the Box boots from (the disk could not hold
/// it), naming the minimum rounded up to a MiB.
fn check_disk_size(requested: u64, base_size: u64, source: &RootfsSource) -> Result<()> {
    if requested >= base_size {
        return Ok(());
    }
    let minimum = base_size.div_ceil(1 << 20) << 20;
    let what = match source {
        RootfsSource::Image { reference, .. } => format!("the image {reference}"),
        RootfsSource::Dir { path } => format!("the rootfs {path}"),
    };
    Err(RuntimeError::Invalid(format!(
        "invalid --disk-size {}: {what} needs at least {}",
        crate::rootfs::size::format_size(requested),
        crate::rootfs::size::format_size(minimum)
    )))
}

/// Refuses network options the chosen backend cannot honour, before anything is made (a Box
/// that could never start is not created).
fn validate_network(opts: &BoxOptions) -> Result<()> {
    use crate::net::NetworkKind;
    if opts.network == NetworkKind::None && !opts.ports.is_empty() {
        let specs: Vec<String> = opts.ports.iter().map(|p| p.to_spec()).collect();
        return Err(RuntimeError::Invalid(format!(
            "cannot publish ports with --network none (the Box has no NIC): \
             drop -p/--publish {} or choose a network",
            specs.join(", ")
        )));
    }
    for dns in &opts.dns {
        crate::net::parse_dns_server(dns)
            .map_err(|e| RuntimeError::Invalid(format!("invalid --dns: {e}")))?;
    }
    Ok(())
}

pub(crate) fn validate_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        && name.len() <= 128;
    if ok {
        Ok(())
    } else {
        Err(RuntimeError::InvalidName(name.into()))
    }
}

/// 32 random hex digits.
pub(crate) fn new_id() -> String {
    let mut buf = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut buf);
    }
    hex::encode(buf)
}

/// A locally administered MAC derived from the Box id (stable across restarts).
pub(crate) fn mac_for(id: &str) -> String {
    let b = id.as_bytes();
    let h = |i: usize| {
        u8::from_str_radix(std::str::from_utf8(&b[i..i + 2]).unwrap_or("00"), 16).unwrap_or(0)
    };
    format!("52:54:00:{:02x}:{:02x}:{:02x}", h(0), h(2), h(4))
}
