//! The layers hold: no import cycle among the core library's top-level
//! modules (ARCHITECTURE.md, "Architecture invariant: layers").
//!
//! Reads every `crates/credbroker-core/src/**/*.rs` (the crates around it
//! cannot close a cycle in it: cargo refuses a dependency cycle, and core
//! depends on neither testkit nor the binary), collects the top-level modules each file names
//! through `crate::` paths (`use crate::x::…`, `crate::x::f()`, and each
//! name in `use crate::{x, y::z}`), and fails naming a cycle if the graph
//! has one. A file `src/a.rs`, `src/a/mod.rs` or `src/a/b/c.rs` belongs to
//! module `a`; `src/lib.rs` and `src/main.rs` are the root and belong to
//! none.
//!
//! Test code is left out, because tests sit above what they test (a unit
//! test in `broker` uses `testkit`, which builds a `Broker`): an item under
//! `#[cfg(test)]` (a `mod tests { … }`, a function, a struct field) is cut
//! from the text before the scan, and a file that a `#[cfg(test)] mod x;`
//! declares (with everything under it) is not read — so `testkit` is no
//! module of the graph. Comments and string literals are blanked first, so
//! prose that mentions `crate::x` makes no edge.
//!
//! The scan reads `crate::` paths only: a top-level file reaching a sibling
//! through `super::x` would go unseen (the crate has none; write `crate::x`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// module → module it names → the files that name it.
type Graph = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

#[test]
fn no_import_cycle_among_top_level_modules() {
    let graph = module_graph(&core_src());

    // The scanner sees what it should: a few edges the lease path cannot do
    // without. An empty graph would pass the cycle check for nothing.
    for (from, to) in [
        ("broker", "store"),
        ("broker", "backend"),
        ("server", "broker"),
    ] {
        assert!(
            graph.get(from).is_some_and(|m| m.contains_key(to)),
            "the scanner missed {from} → {to}; graph: {}",
            describe(&graph)
        );
    }
    assert!(
        !graph.contains_key("testkit"),
        "testkit is test-only (#[cfg(test)] in lib.rs) and no module of the graph"
    );

    // `cargo test --test layers -- --nocapture` shows the graph.
    println!(
        "module graph (module → what it imports):{}",
        describe(&graph)
    );

    if let Some(cycle) = find_cycle(&graph) {
        let mut msg = format!(
            "import cycle among top-level modules: {}\n\
             (ARCHITECTURE.md, \"Architecture invariant: layers\": move the shared \
             type below its users)\n",
            cycle.join(" → ")
        );
        msg += &format!("modules on a cycle: {}\n", on_a_cycle(&graph).join(", "));
        for pair in cycle.windows(2) {
            let files = &graph[&pair[0]][&pair[1]];
            let files: Vec<&str> = files.iter().map(String::as_str).collect();
            msg += &format!("  {} → {}: {}\n", pair[0], pair[1], files.join(", "));
        }
        panic!("{msg}");
    }
}

/// `lib.rs`'s `//!` map names every public module, so a newcomer's first
/// page lists the whole library.
#[test]
fn the_map_in_lib_rs_names_every_public_module() {
    let lib = std::fs::read_to_string(core_src().join("lib.rs")).expect("read core's lib.rs");
    let map: String = lib
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .collect::<Vec<_>>()
        .join("\n");
    let public: Vec<&str> = lib
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod ")?.strip_suffix(';'))
        .collect();
    assert!(public.len() > 30, "found only {public:?} in core's lib.rs");
    let missing: Vec<&&str> = public
        .iter()
        .filter(|m| !map.contains(&format!("[`{m}`]")))
        .collect();
    assert!(
        missing.is_empty(),
        "core's lib.rs //! map does not name these public modules: {missing:?}"
    );
}

#[test]
fn scanner_reads_paths_and_skips_tests_comments_and_strings() {
    let text = r##"
        use crate::alpha::A;
        use crate::{beta, gamma::G as H, delta::{D1, D2}};
        // use crate::comment::X;
        /* crate::block /* nested */ crate::block2 */
        const S: &str = "crate::string";
        const R: &str = r#"crate::raw "quoted" "#;
        const C: char = '{';
        fn f<'a>(x: &'a str) -> Vec<u8> { crate::epsilon::run(x) }
        struct S {
            #[cfg(test)]
            probe: std::collections::HashMap<u8, crate::fieldonly::P>,
            kept: crate::zeta::Z,
        }
        #[cfg(test)]
        fn helper() -> crate::helper_only::T { todo!() }
        #[cfg(test)]
        mod tests {
            use crate::test_only::T;
            fn g() { let s = "}"; let c = '}'; }
        }
        #[cfg(test)]
        mod timeline;
        pub(crate) fn h() {}
    "##;
    let (stripped, test_children) = strip_test_code(&blank(text));
    let names = crate_paths(&stripped, &BTreeMap::new());
    let want: BTreeSet<String> = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(names, want, "stripped text:\n{stripped}");
    assert_eq!(test_children, vec!["timeline".to_string()]);
}

#[test]
fn a_cycle_is_found_and_named() {
    fn edge(g: &mut Graph, a: &str, b: &str) {
        g.entry(a.into())
            .or_default()
            .entry(b.into())
            .or_default()
            .insert(format!("src/{a}.rs"));
    }
    let mut g = Graph::new();
    edge(&mut g, "server", "broker");
    edge(&mut g, "broker", "store");
    edge(&mut g, "store", "config");
    assert_eq!(find_cycle(&g), None);
    edge(&mut g, "config", "broker");
    let cycle = find_cycle(&g).expect("config → broker closes a cycle");
    assert_eq!(cycle, ["broker", "store", "config", "broker"]);
    assert_eq!(on_a_cycle(&g), ["broker", "config", "store"]);
}

/// The real tree with one of the edges that once closed the cycle put
/// back (`backend → check`, for `Finding`): the check fails on it.
#[test]
fn the_real_tree_with_an_old_edge_put_back_has_a_cycle() {
    let copy = tempfile::tempdir().unwrap();
    copy_dir(&core_src(), copy.path());
    let backend = copy.path().join("backend/mod.rs");
    let mut text = std::fs::read_to_string(&backend).unwrap();
    text.push_str("\npub use crate::check::Finding;\n");
    std::fs::write(&backend, text).unwrap();
    let graph = module_graph(copy.path());
    let cycle = find_cycle(&graph).expect("backend → check → backend is a cycle");
    assert!(
        cycle.contains(&"backend".to_string()) && cycle.contains(&"check".to_string()),
        "{cycle:?}"
    );
    assert!(
        find_cycle(&module_graph(&core_src())).is_none(),
        "the tree itself has none"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let dest = to.join(path.file_name().unwrap());
        if path.is_dir() {
            std::fs::create_dir_all(&dest).unwrap();
            copy_dir(&path, &dest);
        } else {
            std::fs::copy(&path, &dest).unwrap();
        }
    }
}

/// The core library's sources.
fn core_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/credbroker-core/src")
}

/// The module graph of the crate whose sources are under `src`.
fn module_graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    walk(src, &mut files);
    files.sort();

    // Names the root re-exports (`pub use error::{Error, Result};`), so a
    // file's `crate::Error` is an edge to `error`.
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("read src/lib.rs");
    let root_aliases = root_reexports(&strip_test_code(&blank(&lib)).0);

    // First pass: each file's text without test code, and the files that
    // `#[cfg(test)] mod x;` declarations make test-only.
    let mut texts = Vec::new();
    let mut test_only: Vec<PathBuf> = Vec::new();
    for path in &files {
        let raw = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let (text, children) = strip_test_code(&blank(&raw));
        let dir = children_dir(path);
        for child in children {
            test_only.push(dir.join(format!("{child}.rs")));
            test_only.push(dir.join(&child));
        }
        texts.push((path.clone(), text));
    }

    let modules: BTreeSet<String> = files
        .iter()
        .filter(|p| !test_only.iter().any(|t| p.starts_with(t)))
        .filter_map(|p| top_module(src, p))
        .collect();

    let mut graph = Graph::new();
    for (path, text) in &texts {
        if test_only.iter().any(|t| path.starts_with(t)) {
            continue;
        }
        let Some(from) = top_module(src, path) else {
            continue;
        };
        let rel = path
            .strip_prefix(env!("CARGO_MANIFEST_DIR"))
            .unwrap_or(path);
        for to in crate_paths(text, &root_aliases) {
            if to != from && modules.contains(&to) {
                graph
                    .entry(from.clone())
                    .or_default()
                    .entry(to)
                    .or_default()
                    .insert(rel.display().to_string());
            }
        }
    }
    graph
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            walk(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/a.rs`, `src/a/…` → `a`; the crate roots → none.
fn top_module(src: &Path, path: &Path) -> Option<String> {
    let rel = path.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    match first.strip_suffix(".rs") {
        Some("lib" | "main") => None,
        Some(stem) => Some(stem.to_string()),
        None => Some(first.to_string()),
    }
}

/// Where the files of `mod x;` declared in `path` live.
fn children_dir(path: &Path) -> PathBuf {
    let dir = path.parent().unwrap().to_path_buf();
    match path.file_stem().and_then(|s| s.to_str()) {
        Some("mod" | "lib" | "main") => dir,
        Some(stem) => dir.join(stem),
        None => dir,
    }
}

/// `pub use m::{A, B};` / `pub use m::A;` in the root → `A` → `m`.
fn root_reexports(lib: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for stmt in lib.split(';') {
        let Some(rest) = stmt.trim().strip_prefix("pub use ") else {
            continue;
        };
        let rest = rest.trim_start_matches("crate::");
        let Some((module, names)) = rest.split_once("::") else {
            continue;
        };
        let names = names.trim().trim_start_matches('{').trim_end_matches('}');
        for name in names.split(',') {
            let name = name.split(" as ").last().unwrap_or("").trim();
            if !name.is_empty() {
                out.insert(name.to_string(), module.trim().to_string());
            }
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The top-level names `text` reaches through `crate::` (and `$crate::`).
fn crate_paths(text: &str, root_aliases: &BTreeMap<String, String>) -> BTreeSet<String> {
    let c: Vec<char> = text.chars().collect();
    let key: Vec<char> = "crate::".chars().collect();
    let mut out = BTreeSet::new();
    let mut push = |name: String| {
        let name = root_aliases.get(&name).cloned().unwrap_or(name);
        if !name.is_empty() {
            out.insert(name);
        }
    };
    let mut i = 0;
    while i + key.len() <= c.len() {
        if c[i..i + key.len()] != key[..] || (i > 0 && is_ident(c[i - 1])) {
            i += 1;
            continue;
        }
        let mut j = i + key.len();
        while c.get(j).is_some_and(|ch| ch.is_whitespace()) {
            j += 1;
        }
        if c.get(j) == Some(&'{') {
            // `crate::{a, b::c, d::{e, f}}`: the first name of each item.
            let mut depth = 0;
            let mut item = String::new();
            let mut at_start = true;
            j += 1;
            while j < c.len() {
                match c[j] {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        push(std::mem::take(&mut item));
                        at_start = true;
                    }
                    ch if depth == 0 && at_start && is_ident(ch) => item.push(ch),
                    ch if depth == 0 && !item.is_empty() && !is_ident(ch) => at_start = false,
                    _ => {}
                }
                j += 1;
            }
            push(item);
        } else {
            let name: String = c[j..].iter().take_while(|ch| is_ident(**ch)).collect();
            push(name);
        }
        i = j.max(i + 1);
    }
    out
}

/// `text` with comments and the contents of string and char literals
/// replaced, so neither braces nor paths inside them count.
fn blank(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        let next = c.get(i + 1).copied();
        if ch == '/' && next == Some('/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
            continue;
        }
        if ch == '/' && next == Some('*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
            continue;
        }
        let after_ident = i > 0 && is_ident(c[i - 1]);
        if !after_ident && (ch == 'r' || (ch == 'b' && next == Some('r'))) {
            // Raw strings: r"…", r#"…"#, br"…".
            let mut j = i + if ch == 'b' { 2 } else { 1 };
            let mut hashes = 0;
            while c.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if c.get(j) == Some(&'"') {
                j += 1;
                while j < c.len() {
                    if c[j] == '"' && (0..hashes).all(|k| c.get(j + 1 + k) == Some(&'#')) {
                        j += 1 + hashes;
                        break;
                    }
                    j += 1;
                }
                out.push_str("\"\"");
                i = j;
                continue;
            }
        }
        if ch == '"' {
            let mut j = i + 1;
            while j < c.len() && c[j] != '"' {
                if c[j] == '\\' {
                    j += 1;
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j + 1;
            continue;
        }
        if ch == '\'' {
            // '\n', '\'', '\u{…}'; 'x'; otherwise a lifetime.
            if next == Some('\\') {
                let mut j = i + 3;
                while j < c.len() && c[j] != '\'' {
                    j += 1;
                }
                out.push_str("' '");
                i = j + 1;
                continue;
            }
            if c.get(i + 2) == Some(&'\'') {
                out.push_str("' '");
                i += 3;
                continue;
            }
        }
        out.push(ch);
        i += 1;
    }
    out
}

/// `text` (already blanked) without the items under `#[cfg(test)]`, and
/// the names of the `#[cfg(test)] mod x;` files it declares.
fn strip_test_code(text: &str) -> (String, Vec<String>) {
    const ATTR: &str = "#[cfg(test)]";
    let c: Vec<char> = text.chars().collect();
    let attr: Vec<char> = ATTR.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut children = Vec::new();
    let mut i = 0;
    while i < c.len() {
        if !c[i..].starts_with(&attr) {
            out.push(c[i]);
            i += 1;
            continue;
        }
        let start = i + attr.len();
        let end = item_end(&c, start);
        let item: String = c[start..end].iter().collect();
        let words: Vec<&str> = item
            .split(|ch: char| ch.is_whitespace() || ch == ';')
            .filter(|w| !w.is_empty())
            .collect();
        if let ["mod", name] | ["pub", "mod", name] | ["pub(crate)", "mod", name] = words[..] {
            if item.trim_end().ends_with(';') {
                children.push(name.to_string());
            }
        }
        out.push(' ');
        i = end;
    }
    (out, children)
}

/// The end of the item (or field, or statement) that starts at `start`,
/// after its attributes: past its `;` or `,`, past its `{ … }` block, or
/// just before the bracket that closes what holds it.
fn item_end(c: &[char], start: usize) -> usize {
    let mut depth = 0usize; // ( [ <
    let mut j = start;
    // Further attributes on the same item.
    loop {
        while c.get(j).is_some_and(|ch| ch.is_whitespace()) {
            j += 1;
        }
        if c.get(j) == Some(&'#') && c.get(j + 1) == Some(&'[') {
            j = matching(c, j + 1, '[', ']') + 1;
        } else {
            break;
        }
    }
    while j < c.len() {
        let prev = if j > 0 { c[j - 1] } else { ' ' };
        match c[j] {
            '(' | '[' | '<' => depth += 1,
            '>' if prev == '-' || prev == '=' => {}
            ')' | ']' | '}' if depth == 0 => return j,
            ')' | ']' | '>' => depth = depth.saturating_sub(1),
            '{' => {
                j = matching(c, j, '{', '}');
                if depth == 0 {
                    return j + 1;
                }
            }
            ';' | ',' if depth == 0 => return j + 1,
            _ => {}
        }
        j += 1;
    }
    c.len()
}

/// The index of the bracket that closes the one at `open`.
fn matching(c: &[char], open: usize, o: char, cl: char) -> usize {
    let mut depth = 0;
    for (k, ch) in c.iter().enumerate().skip(open) {
        if *ch == o {
            depth += 1;
        } else if *ch == cl {
            depth -= 1;
            if depth == 0 {
                return k;
            }
        }
    }
    c.len() - 1
}

/// A cycle (first module repeated last), if the graph has one.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        graph: &Graph,
        node: &str,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        marks.insert(node.to_string(), Mark::Open);
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flat_map(|m| m.keys()) {
            match marks.get(next) {
                Some(Mark::Open) => {
                    let at = path.iter().position(|p| p == next).unwrap();
                    let mut cycle = path[at..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Some(Mark::Done) => {}
                None => {
                    if let Some(cycle) = visit(graph, next, marks, path) {
                        return Some(cycle);
                    }
                }
            }
        }
        path.pop();
        marks.insert(node.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in graph.keys() {
        if !marks.contains_key(node) {
            if let Some(cycle) = visit(graph, node, &mut marks, &mut Vec::new()) {
                return Some(cycle);
            }
        }
    }
    None
}

/// Every module that reaches itself (all the cycles' members).
fn on_a_cycle(graph: &Graph) -> Vec<String> {
    let reaches_itself = |start: &String| {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<&String> = graph
            .get(start)
            .into_iter()
            .flat_map(|m| m.keys())
            .collect();
        while let Some(node) = todo.pop() {
            if node == start {
                return true;
            }
            if seen.insert(node) {
                todo.extend(graph.get(node).into_iter().flat_map(|m| m.keys()));
            }
        }
        false
    };
    graph
        .keys()
        .filter(|m| reaches_itself(m))
        .cloned()
        .collect()
}

/// `a → b, c` lines, for a failure message.
fn describe(graph: &Graph) -> String {
    graph
        .iter()
        .map(|(a, to)| {
            format!(
                "\n  {a} → {}",
                to.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })
        .collect()
}
