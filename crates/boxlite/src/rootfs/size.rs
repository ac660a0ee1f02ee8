//! Sizes as users write them (`--disk-size 10G`, `volume create --size 512M`): a number with an
//! optional binary suffix K, M, G, T (also `KiB`, `MB`…, all powers of 1024), or plain bytes.

/// A size that could not be parsed.
#[derive(Debug, thiserror::Error)]
#[error("invalid size {input:?}: {reason} (examples: 512M, 10G, 1048576)")]
pub struct SizeError {
    pub input: String,
    pub reason: &'static str,
}

/// Parses `512M`, `10G`, `1.5G`, `4096`, `2GiB` into bytes (suffixes are powers of 1024).
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let err = |reason| SizeError {
        input: input.to_string(),
        reason,
    };
    let s = input.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    if number.is_empty() {
        return Err(err("no number"));
    }
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(err("unknown unit")),
    };
    let bytes = if let Some((whole, frac)) = number.split_once('.') {
        let whole: u64 = whole.parse().map_err(|_| err("not a number"))?;
        if frac.is_empty() || frac.len() > 6 || frac.contains('.') {
            return Err(err("not a number"));
        }
        let frac_value: u64 = frac.parse().map_err(|_| err("not a number"))?;
        let scale = 10u64.pow(frac.len() as u32);
        let unit = 1u64 << shift;
        whole
            .checked_mul(unit)
            .and_then(|w| w.checked_add(frac_value.checked_mul(unit)? / scale))
            .ok_or_else(|| err("too large"))?
    } else {
        let n: u64 = number.parse().map_err(|_| err("not a number"))?;
        n.checked_mul(1u64 << shift)
            .ok_or_else(|| err("too large"))?
    };
    if bytes == 0 {
        return Err(err("must be more than zero"));
    }
    Ok(bytes)
}

/// Formats bytes the way `parse_size` reads them, with the largest exact unit (`10G`, `1536M`).
pub fn format_size(bytes: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes >= 1 << shift && bytes.trailing_zeros() >= shift {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_users_write() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("10g").unwrap(), 10 << 30);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        for bad in ["", "G", "0", "12X", "1..5G", "-1G", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(format_size(10 << 30), "10G");
        assert_eq!(format_size(1536 << 20), "1536M");
        assert_eq!(format_size(1000), "1000");
    }
}
