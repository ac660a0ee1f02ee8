//! Volume names: what `boxlite volume create NAME` and `-v NAME:/path` accept. The rule is
//! Docker's (`[A-Za-z0-9][A-Za-z0-9_.-]*`), capped at 64 characters, so a name is always one safe
//! path component (no `/`, no `..`) and never looks like a host path in `-v`.

/// Longest volume name.
pub const MAX_VOLUME_NAME: usize = 64;

/// A volume name boxlite does not accept.
#[derive(Debug, thiserror::Error)]
#[error("invalid volume name {name:?}: {reason}")]
pub struct NameError {
    pub name: String,
    pub reason: &'static str,
}

/// Checks a volume name.
pub fn validate_volume_name(name: &str) -> Result<(), NameError> {
    let bad = |reason| {
        Err(NameError {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() || name.len() > MAX_VOLUME_NAME {
        return bad("must be 1 to 64 characters");
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return bad("must start with a letter or digit");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return bad("only letters, digits, '_', '.' and '-' are allowed (no '/')");
    }
    if name.contains("..") {
        return bad("must not contain '..'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["data", "pg-data_1", "v1.2", "A"] {
            assert!(validate_volume_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "../x",
            "a..b",
            "-x",
            ".x",
            "_x",
            "a b",
            "é",
            "a\0",
            &"x".repeat(65),
        ] {
            assert!(validate_volume_name(bad).is_err(), "{bad:?}");
        }
    }
}
