//! The sealing key's text (and the key decoded from it) leaves no copy in
//! memory the process frees without wiping: every heap block freed while
//! the key is loaded is scanned for it. A binary of its own, because the
//! scan is a global allocator — the other tests keep the system's as is.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use credbroker::config::SecretSource;
use credbroker::static_roles::Sealer;

/// The key as the file holds it (hex) and as bytes.
const KEY_HEX: &[u8; 64] = b"9c1e5bd3a2f0478e6d21c0b7e4f9a35d8b62c1f0e7d4a39b5c8e2f1a0d6b7c43";
const KEY_B64: &[u8; 44] = b"nB5b06LwR45tIcC35PmjXYtiwfDn1KObXI4vGg1rfEM=";

/// Scanning on or off, and how many freed blocks held a copy.
static SCAN: AtomicBool = AtomicBool::new(false);
static HITS: AtomicUsize = AtomicUsize::new(0);

struct Scanning;

/// What a freed block must not hold: 16 bytes of either text, or 8 of the
/// raw key (a decoding buffer that grew leaves such a prefix behind).
fn holds_a_copy(block: &[u8]) -> bool {
    let raw = key_bytes();
    let needles: [&[u8]; 3] = [&KEY_HEX[..16], &KEY_B64[..16], &raw[..8]];
    needles
        .iter()
        .any(|n| block.windows(n.len()).any(|w| w == *n))
}

fn key_bytes() -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        let hex = |c: u8| match c {
            b'0'..=b'9' => c - b'0',
            _ => c - b'a' + 10,
        };
        *o = hex(KEY_HEX[2 * i]) << 4 | hex(KEY_HEX[2 * i + 1]);
    }
    out
}

unsafe impl GlobalAlloc for Scanning {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if SCAN.load(Ordering::SeqCst) {
            // SAFETY: the block is ours until `System.dealloc` below.
            let block = unsafe { std::slice::from_raw_parts(ptr, layout.size()) };
            if holds_a_copy(block) {
                HITS.fetch_add(1, Ordering::SeqCst);
            }
        }
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Scanning = Scanning;

/// Loads the key from a file holding `text` (with a line end) while every
/// freed block is scanned; the number of blocks that held a copy.
fn copies_left_by_loading(text: &[u8]) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("static.key");
    let mut content = text.to_vec();
    content.push(b'\n');
    std::fs::write(&path, &content).unwrap();
    // The test's own copy is wiped before the scan starts.
    content.iter_mut().for_each(|b| *b = 0);
    drop(content);
    let source = SecretSource::File(path);
    HITS.store(0, Ordering::SeqCst);
    SCAN.store(true, Ordering::SeqCst);
    let sealer = Sealer::load(&source);
    SCAN.store(false, Ordering::SeqCst);
    let sealer = sealer.unwrap();
    assert_eq!(sealer.key_id().len(), 16);
    HITS.load(Ordering::SeqCst)
}

/// One test (the scan is process-wide): hex, then base64.
#[test]
fn loading_the_sealing_key_leaves_no_unwiped_copy_of_its_text_or_bytes() {
    let hex = copies_left_by_loading(KEY_HEX);
    let b64 = copies_left_by_loading(KEY_B64);
    assert_eq!(
        (hex, b64),
        (0, 0),
        "freed heap blocks still held the sealing key (hex file, base64 file)"
    );
    // The scan does see a copy that is freed unwiped.
    SCAN.store(true, Ordering::SeqCst);
    drop(std::hint::black_box(KEY_HEX.to_vec()));
    SCAN.store(false, Ordering::SeqCst);
    assert_eq!(HITS.load(Ordering::SeqCst), 1, "the scan found nothing");
}
