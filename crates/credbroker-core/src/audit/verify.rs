//! The verifier and the readers: `verify`/`verify_files` check the chain
//! of one file or of a sequence of files, `rotated_files` lists a log's
//! files in chain order, `read_records`/`read_tail` read records back.
//! Apart from the writer: they only read, and `credbroker audit verify`
//! runs them on files no broker has open.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{siblings, split_hash, Record, GENESIS};

/// The result of checking one file or a sequence of files.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every record is intact and chained; `records` counted. `first_seq`
    /// above 1 means the first file continues an earlier one that was not
    /// given (`first_prev` is the hash it links to).
    Intact {
        records: u64,
        last_hash: String,
        first_seq: u64,
        first_prev: String,
    },
    /// The first record that does not hold: its file and 1-based line.
    Broken {
        file: PathBuf,
        line: u64,
        reason: String,
    },
}

/// Checks every line of one file: its own hash, its link to the line
/// before, and that sequence numbers run on without a gap. A file that
/// starts mid-chain (rotated) is intact if it holds together; `first_seq`
/// says where it starts.
pub fn verify(path: &Path) -> std::io::Result<Verdict> {
    verify_files(&[path.to_path_buf()])
}

/// Checks files as one chain, in the order given (oldest first): each
/// file's first record must link to the last record of the file before.
pub fn verify_files(paths: &[PathBuf]) -> std::io::Result<Verdict> {
    let mut prev: Option<String> = None;
    let mut seq = 0u64;
    let mut first = None;
    let mut records = 0u64;
    for path in paths {
        let reader = BufReader::new(File::open(path)?);
        for (line_no, line) in (1u64..).zip(reader.split(b'\n')) {
            let broken = |reason: String| {
                Ok(Verdict::Broken {
                    file: path.clone(),
                    line: line_no,
                    reason,
                })
            };
            let bytes = line?;
            let Ok(line) = String::from_utf8(bytes) else {
                return broken("not UTF-8".into());
            };
            let Some((body, hash)) = split_hash(&line) else {
                return broken("no hash field: the record was altered or cut".into());
            };
            if hex::encode(Sha256::digest(body.as_bytes())) != hash {
                return broken("hash does not match the record's content: it was altered".into());
            }
            let record: Record = match serde_json::from_str(&format!("{body}}}")) {
                Ok(r) => r,
                Err(e) => return broken(format!("not a valid record: {e}")),
            };
            match &prev {
                // The very first record: the start of the chain, or where
                // the given files pick it up.
                None => {
                    if record.seq == 1 && record.prev != GENESIS {
                        return broken("the first record does not start a chain".into());
                    }
                    first = Some((record.seq, record.prev.clone()));
                }
                Some(p) => {
                    if &record.prev != p {
                        let what = if line_no == 1 {
                            "this file does not continue the file before it (a file is missing, \
                             out of order, or was cut)"
                                .to_string()
                        } else {
                            format!(
                                "chain broken: record {} does not follow the one before it (a record \
                                 was removed, inserted or moved)",
                                record.seq
                            )
                        };
                        return broken(what);
                    }
                    if record.seq != seq + 1 {
                        return broken(format!("sequence jumps from {seq} to {}", record.seq));
                    }
                }
            }
            prev = Some(hash.to_string());
            seq = record.seq;
            records += 1;
        }
    }
    let (first_seq, first_prev) = first.unwrap_or((1, GENESIS.to_string()));
    Ok(Verdict::Intact {
        records,
        last_hash: prev.unwrap_or_else(|| GENESIS.to_string()),
        first_seq,
        first_prev,
    })
}

/// The files of a log in chain order: our own rotations `<path>.<seq>`
/// (and `<path>.<seq>-<n>`, a name `<path>.<seq>` had taken already) by
/// sequence number, then `path` itself.
pub fn rotated_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut rotated: Vec<((u64, u32), PathBuf)> = siblings(path)?
        .into_iter()
        .filter_map(|(suffix, p)| {
            let rest = suffix.strip_prefix('.')?;
            // `<seq>`, or `<seq>-<n>` when `<seq>` was taken (`rotate_away`).
            let (seq, n) = match rest.split_once('-') {
                Some((seq, n)) => (seq.parse().ok()?, n.parse().ok()?),
                None => (rest.parse().ok()?, 0),
            };
            Some(((seq, n), p))
        })
        .collect();
    rotated.sort();
    let mut files: Vec<PathBuf> = rotated.into_iter().map(|(_, p)| p).collect();
    if path.exists() {
        files.push(path.to_path_buf());
    }
    Ok(files)
}

/// Reads every record of a file, for tests and `admin` tooling.
pub fn read_records(path: &Path) -> std::io::Result<Vec<Record>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .filter_map(|l| {
            split_hash(l).and_then(|(body, _)| serde_json::from_str(&format!("{body}}}")).ok())
        })
        .collect())
}

/// The records in the last `max_bytes` of a file, oldest first: what a
/// listing of the latest records reads, so a large log costs no more than
/// its tail. A line cut by the start of the window is skipped.
pub fn read_tail(path: &Path, max_bytes: u64) -> std::io::Result<Vec<Record>> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let start = len.saturating_sub(max_bytes);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::with_capacity((len - start) as usize);
    file.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let mut lines = text.lines();
    if start > 0 {
        lines.next();
    }
    Ok(lines
        .filter_map(|l| {
            split_hash(l).and_then(|(body, _)| serde_json::from_str(&format!("{body}}}")).ok())
        })
        .collect())
}
