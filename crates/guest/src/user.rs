//! Resolves an exec request's `user` (`name`, `uid`, `name:group`, `uid:gid`, with name or number on
//! either side) against the Box's /etc/passwd and /etc/group, as docker and runc do: a name must
//! exist; a number need not; supplementary groups are the groups that list the user as a member;
//! HOME comes from the passwd entry, else `/`.

use std::fs;
use std::path::Path;

use crate::spawn::Ids;

/// Who a process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub ids: Ids,
    pub home: String,
}

/// Why a user specification could not be resolved.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    #[error("unable to find user {0}: no matching entries in passwd file")]
    UnknownUser(String),
    #[error("unable to find group {0}: no matching entries in group file")]
    UnknownGroup(String),
    #[error("invalid user specification {0:?}")]
    Invalid(String),
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

/// Resolves `spec` against the files under `etc` (the Box's /etc).
pub fn resolve(spec: &str, etc: &Path) -> Result<User, UserError> {
    let passwd = parse_passwd(&fs::read_to_string(etc.join("passwd")).unwrap_or_default());
    let groups = parse_group(&fs::read_to_string(etc.join("group")).unwrap_or_default());
    resolve_in(spec, &passwd, &groups)
}

fn resolve_in(
    spec: &str,
    passwd: &[PasswdEntry],
    groups: &[GroupEntry],
) -> Result<User, UserError> {
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if group_part == Some("") || (user_part.is_empty() && group_part.is_some()) {
        return Err(UserError::Invalid(spec.to_string()));
    }
    let user_part = if user_part.is_empty() { "0" } else { user_part };

    let entry = match user_part.parse::<u32>() {
        Ok(uid) => passwd.iter().find(|e| e.uid == uid),
        Err(_) => Some(
            passwd
                .iter()
                .find(|e| e.name == user_part)
                .ok_or_else(|| UserError::UnknownUser(user_part.to_string()))?,
        ),
    };
    let uid = match entry {
        Some(e) => e.uid,
        None => user_part.parse().expect("numeric when no entry"),
    };
    let home = entry.map_or_else(|| "/".to_string(), |e| e.home.clone());

    let gid = match group_part {
        None => entry.map_or(0, |e| e.gid),
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                groups
                    .iter()
                    .find(|e| e.name == g)
                    .ok_or_else(|| UserError::UnknownGroup(g.to_string()))?
                    .gid
            }
        },
    };

    let mut supplementary = vec![gid];
    if let Some(e) = entry {
        for group in groups.iter().filter(|g| g.members.contains(&e.name)) {
            if !supplementary.contains(&group.gid) {
                supplementary.push(group.gid);
            }
        }
    }
    Ok(User {
        ids: Ids {
            uid,
            gid,
            groups: supplementary,
        },
        home,
    })
}

fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 7 {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_string(),
            })
        })
        .collect()
}

fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 4 {
                return None;
            }
            Some(GroupEntry {
                name: f[0].to_string(),
                gid: f[2].parse().ok()?,
                members: f[3]
                    .split(',')
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .map(String::from)
                    .collect(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        tester:x:1000:1000:Tester:/home/tester:/bin/sh\n\
        broken line\n";
    const GROUP: &str = "root:x:0:\ntester:x:1000:\nstaff:x:50:tester,other\nwheel:x:10:root\n";

    fn resolve_here(spec: &str) -> Result<User, UserError> {
        resolve_in(spec, &parse_passwd(PASSWD), &parse_group(GROUP))
    }

    #[test]
    fn names_resolve_with_supplementary_groups_and_home() {
        let u = resolve_here("tester").unwrap();
        assert_eq!((u.ids.uid, u.ids.gid), (1000, 1000));
        assert_eq!(u.ids.groups, vec![1000, 50]);
        assert_eq!(u.home, "/home/tester");
        assert_eq!(resolve_here("").unwrap().ids.groups, vec![0, 10]);
    }

    #[test]
    fn numbers_need_no_entry_and_groups_override() {
        let u = resolve_here("1234").unwrap();
        assert_eq!((u.ids.uid, u.ids.gid, u.home.as_str()), (1234, 0, "/"));
        let u = resolve_here("1000:staff").unwrap();
        assert_eq!((u.ids.uid, u.ids.gid), (1000, 50));
        let u = resolve_here("tester:7").unwrap();
        assert_eq!(u.ids.gid, 7);
        assert_eq!(u.ids.groups, vec![7, 50]);
    }

    #[test]
    fn unknown_names_are_errors_naming_them() {
        let e = resolve_here("nobody-here").unwrap_err();
        assert!(e.to_string().contains("nobody-here"), "{e}");
        let e = resolve_here("tester:nogroup").unwrap_err();
        assert!(e.to_string().contains("nogroup"), "{e}");
        assert!(resolve_here("tester:").is_err());
    }
}
