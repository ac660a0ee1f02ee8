//! Finds the executable for argv[0] the way docker reports it: a name without a slash is searched
//! in PATH (from the request's environment, else the usual default); a path is taken as given.
//! Messages follow docker's wording, which the host maps to exit status 127 ("not found", "no such
//! file or directory") or 126 ("permission denied", "is a directory").

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// PATH when the environment has none (docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why argv[0] cannot be run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LookupError {
    #[error("exec: {0:?}: executable file not found in $PATH")]
    NotInPath(String),
    #[error("exec: {0:?}: stat {0}: no such file or directory")]
    Missing(String),
    #[error("exec: {0:?}: is a directory: permission denied")]
    Directory(String),
    #[error("exec: {0:?}: permission denied")]
    NotExecutable(String),
    #[error("exec: no command given")]
    Empty,
}

/// Resolves `program` against `env`'s PATH.
pub fn find_program(program: &str, env: &[String]) -> Result<PathBuf, LookupError> {
    if program.is_empty() {
        return Err(LookupError::Empty);
    }
    if program.contains('/') {
        return check(Path::new(program)).map(|()| PathBuf::from(program));
    }
    let path = env
        .iter()
        .find_map(|kv| kv.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    for dir in path.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = Path::new(dir).join(program);
        if let Ok(meta) = std::fs::metadata(&candidate) {
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return Ok(candidate);
            }
        }
    }
    Err(LookupError::NotInPath(program.to_string()))
}

fn check(path: &Path) -> Result<(), LookupError> {
    let name = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|_| LookupError::Missing(name.clone()))?;
    if meta.is_dir() {
        return Err(LookupError::Directory(name));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(LookupError::NotExecutable(name));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn searches_the_requests_path_only() {
        let env = vec!["PATH=/nonexistent:/bin".to_string()];
        assert_eq!(find_program("sh", &env).unwrap(), PathBuf::from("/bin/sh"));
        let env = vec!["PATH=/nonexistent".to_string()];
        assert_eq!(
            find_program("sh", &env),
            Err(LookupError::NotInPath("sh".into()))
        );
    }

    #[test]
    fn explicit_paths_report_docker_like_errors() {
        let e = find_program("/no/such/thing", &[]).unwrap_err();
        assert!(e.to_string().contains("no such file or directory"), "{e}");
        let e = find_program("/etc", &[]).unwrap_err();
        assert!(e.to_string().contains("permission denied"), "{e}");
        let e = find_program("/etc/passwd", &[]).unwrap_err();
        assert!(e.to_string().contains("permission denied"), "{e}");
        assert!(find_program("/bin/sh", &[]).is_ok());
    }
}
