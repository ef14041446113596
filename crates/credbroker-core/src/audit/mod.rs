//! Append-only, hash-chained JSON lines: one record per request (allowed or
//! denied) and per reaper action.
//!
//! Each line is `{…,"prev":"<hash of the line before>","hash":"<sha256>"}`
//! where `hash` covers the exact bytes of the line up to `,"hash":`. Hashing
//! bytes rather than re-serialised JSON means verification never depends on
//! field order or number formatting. A changed byte, a deleted line or two
//! swapped lines all break the chain at a precise record; `seq` names it.
//! (Cutting lines off the end is only visible against a copy shipped
//! elsewhere, which is what `seq`/`hash` of the last line are for.)
//!
//! The chain runs on across files: `reopen` (SIGHUP, after logrotate moved
//! the file) and `rotate_size` (our own rotation, to `<path>.<last seq>`)
//! start a new file whose first record links to the last of the old one,
//! and `verify_files` checks a sequence of files as one chain. A new file
//! is never left empty — its first record says where the chain came from —
//! so a broker restarted after a rotation continues the chain too.
//!
//! One file per concern: `record.rs` what a record holds (and the `via`
//! scope that marks it), `writer.rs` the writer (`AuditLog`: append, the
//! chain, rotation), `verify.rs` the verifier and the readers. This file
//! holds what both ends share: the line format (`GENESIS`, the hash field)
//! and where rotated files are (`siblings`).

mod record;
#[cfg(test)]
mod tests;
mod verify;
mod writer;

pub use record::{current_via, in_via, via, Event, Outcome, Record};
pub use verify::{read_records, read_tail, rotated_files, verify, verify_files, Verdict};
pub use writer::AuditLog;

use std::path::{Path, PathBuf};

/// `prev` of the first record in a file.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const HASH_MARK: &str = ",\"hash\":\"";

fn split_hash(line: &str) -> Option<(&str, &str)> {
    let at = line.rfind(HASH_MARK)?;
    let hash = line[at + HASH_MARK.len()..].strip_suffix("\"}")?;
    (hash.len() == 64).then_some((&line[..at], hash))
}

/// The files beside `path` whose names start with its name, each with the
/// rest of its name (`.5000`, `.1`, `-20261201`): where rotated logs are.
fn siblings(path: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let (dir, name) = crate::fsutil::dir_and_name(path);
    let name = name.ok_or_else(|| std::io::Error::other("not a file name"))?;
    Ok(std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().into_string().ok()?;
            let suffix = n.strip_prefix(name)?.to_string();
            Some((suffix, e.path()))
        })
        .collect())
}
