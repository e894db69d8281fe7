//! The shape of the code, checked (issue 23): no import cycles between sibling modules of
//! `dataplane/src`, no file over `FILE_LINES_MAX` lines, no function outside tests over
//! `FN_LINES_MAX` lines. What the renovation has not reached yet is listed below with its size
//! today: a listed item may shrink (then lower or drop its entry) but not grow, and nothing new
//! may join the lists. The lists are the renovation's remaining work, meant to empty.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const FILE_LINES_MAX: usize = 900;
const FN_LINES_MAX: usize = 80;

/// Files over `FILE_LINES_MAX` lines, with their length today.
const LONG_FILES: &[(&str, usize)] = &[];

/// Functions outside tests over `FN_LINES_MAX` lines (`file::function`), with their length today.
const LONG_FNS: &[(&str, usize)] = &[];

/// Import cycles between sibling modules that remain, as `parent: a -> b -> … -> a`.
const CYCLES: &[&str] = &[];

fn source_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every source file, as (path relative to `src`, text).
fn sources() -> Vec<(String, String)> {
    let root = source_root();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let relative = path
                .strip_prefix(&root)
                .map(|p| p.to_string_lossy().replace('\\', "/"))
                .unwrap_or_default();
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            (relative, text)
        })
        .collect()
}

/// The module path of a file: `storage/engine/mod.rs` is `storage::engine`.
fn module_of(file: &str) -> Vec<String> {
    let trimmed = file.trim_end_matches(".rs");
    let mut parts: Vec<String> = trimmed.split('/').map(str::to_string).collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

fn is_test_file(file: &str) -> bool {
    let name = file.rsplit('/').next().unwrap_or(file);
    name == "tests.rs" || name.ends_with("_tests.rs") || file.split('/').any(|d| d == "tests")
}

/// The text with comments, string and char literals blanked out (same length, newlines
/// kept), so that braces and paths can be found by scanning.
fn code_only(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else if c == 'r' && (next == Some('"') || next == Some('#')) && {
            let mut j = i + 1;
            while chars.get(j) == Some(&'#') {
                j += 1;
            }
            chars.get(j) == Some(&'"') && (i == 0 || !chars[i - 1].is_alphanumeric())
        } {
            let mut hashes = 0;
            let mut j = i + 1;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            // Opening: r, hashes, quote.
            for _ in i..=j {
                out.push(' ');
            }
            i = j + 1;
            loop {
                if i >= chars.len() {
                    break;
                }
                if chars[i] == '"' && (1..=hashes).all(|k| chars.get(i + k) == Some(&'#')) {
                    for _ in 0..=hashes {
                        out.push(' ');
                    }
                    i += hashes + 1;
                    break;
                }
                out.push(blank(chars[i]));
                i += 1;
            }
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < chars.len() {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a).
            let close = if next == Some('\\') {
                (i + 2..chars.len().min(i + 12)).find(|&k| chars[k] == '\'')
            } else if chars.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            match close {
                Some(end) => {
                    for _ in i..=end {
                        out.push(' ');
                    }
                    i = end + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// Line ranges (0-based, inclusive) of `#[cfg(test)]` items (test modules and helpers).
fn test_regions(lines: &[&str]) -> Vec<(usize, usize)> {
    let mut regions = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim() == "#[cfg(test)]" {
            let start = i;
            let mut j = i + 1;
            // The item after the attribute: to its closing brace, or its `;`.
            let mut depth = 0i32;
            let mut opened = false;
            while j < lines.len() {
                for ch in lines[j].chars() {
                    match ch {
                        '{' => {
                            depth += 1;
                            opened = true;
                        }
                        '}' => depth -= 1,
                        _ => {}
                    }
                }
                if (opened && depth <= 0) || (!opened && lines[j].trim_end().ends_with(';')) {
                    break;
                }
                j += 1;
            }
            regions.push((start, j));
            i = j + 1;
        } else {
            i += 1;
        }
    }
    regions
}

/// Functions of a file outside tests: (name, lines from signature to closing brace).
fn functions(code: &str) -> Vec<(String, usize)> {
    let lines: Vec<&str> = code.lines().collect();
    let tests = test_regions(&lines);
    let in_test = |line: usize| tests.iter().any(|(a, b)| (*a..=*b).contains(&line));
    let mut found = Vec::new();
    for (start, line) in lines.iter().enumerate() {
        let Some(at) = line.find("fn ") else { continue };
        let before = &line[..at];
        let is_item = before.split_whitespace().all(|word| {
            matches!(word, "pub" | "async" | "const" | "unsafe" | "extern")
                || word.starts_with("pub(")
        });
        if !is_item || in_test(start) {
            continue;
        }
        let name: String = line[at + 3..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if name.is_empty() {
            continue;
        }
        // The body: from the first `{` at this item's level to its match; a `;` before any
        // `{` is a declaration without a body.
        let mut depth = 0i32;
        let mut opened = false;
        let mut end = None;
        'scan: for (offset, text) in lines[start..].iter().enumerate() {
            let text = if offset == 0 { &text[at..] } else { text };
            for ch in text.chars() {
                match ch {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => {
                        depth -= 1;
                        if opened && depth == 0 {
                            end = Some(start + offset);
                            break 'scan;
                        }
                    }
                    ';' if !opened && depth == 0 => break 'scan,
                    _ => {}
                }
            }
        }
        if let Some(end) = end {
            found.push((name, end - start + 1));
        }
    }
    found
}

/// The module paths a file's non-test code names (`crate::…` and `super::…`), resolved to
/// the longest prefix that is a module of the crate.
fn uses(module: &[String], code: &str, modules: &BTreeSet<Vec<String>>) -> BTreeSet<Vec<String>> {
    let lines: Vec<&str> = code.lines().collect();
    let tests = test_regions(&lines);
    let mut out = BTreeSet::new();
    for (number, line) in lines.iter().enumerate() {
        if tests.iter().any(|(a, b)| (*a..=*b).contains(&number)) {
            continue;
        }
        for (at, _) in line
            .match_indices("crate::")
            .chain(line.match_indices("super::"))
        {
            if at > 0 {
                let before = line.as_bytes()[at - 1];
                if before.is_ascii_alphanumeric() || before == b'_' || before == b':' {
                    continue;
                }
            }
            let path: String = line[at..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let mut segments: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
            let mut base: Vec<String> = Vec::new();
            if segments.first() == Some(&"crate") {
                segments.remove(0);
            } else {
                base = module.to_vec();
                while segments.first() == Some(&"super") {
                    segments.remove(0);
                    base.pop();
                }
            }
            let mut full = base;
            full.extend(segments.iter().map(|s| s.to_string()));
            while !full.is_empty() && !modules.contains(&full) {
                full.pop();
            }
            out.insert(full);
        }
    }
    out
}

#[test]
fn no_file_is_longer_than_the_bound_and_the_long_ones_only_shrink() {
    let mut problems = Vec::new();
    let listed: BTreeMap<&str, usize> = LONG_FILES.iter().copied().collect();
    for (file, text) in sources() {
        let lines = text.lines().count();
        match listed.get(file.as_str()) {
            Some(&today) if lines > today => problems.push(format!(
                "{file}: {lines} lines, listed at {today}: it may only shrink"
            )),
            Some(&today) if lines <= FILE_LINES_MAX => problems.push(format!(
                "{file}: {lines} lines, within the bound now: drop its entry (listed at {today})"
            )),
            Some(_) => {}
            None if lines > FILE_LINES_MAX => {
                problems.push(format!("{file}: {lines} lines, over {FILE_LINES_MAX}"))
            }
            None => {}
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn no_function_outside_tests_is_longer_than_the_bound_and_the_long_ones_only_shrink() {
    let mut problems = Vec::new();
    let listed: BTreeMap<&str, usize> = LONG_FNS.iter().copied().collect();
    let mut seen = BTreeSet::new();
    for (file, text) in sources() {
        if is_test_file(&file) {
            continue;
        }
        for (name, lines) in functions(&code_only(&text)) {
            let key = format!("{file}::{name}");
            if lines <= FN_LINES_MAX {
                continue;
            }
            seen.insert(key.clone());
            match listed.get(key.as_str()) {
                Some(&today) if lines > today => problems.push(format!(
                    "{key}: {lines} lines, listed at {today}: it may only shrink"
                )),
                Some(_) => {}
                None => problems.push(format!("(\"{key}\", {lines}),")),
            }
        }
    }
    for (key, today) in LONG_FNS {
        if !seen.contains(*key) {
            problems.push(format!(
                "{key}: within {FN_LINES_MAX} lines now (or gone): drop its entry (listed at {today})"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "functions over {FN_LINES_MAX} lines:\n{}",
        problems.join("\n")
    );
}

#[test]
fn sibling_modules_import_each_other_in_one_direction_only() {
    let files = sources();
    let modules: BTreeSet<Vec<String>> = files.iter().map(|(f, _)| module_of(f)).collect();
    // Per parent module, the edges between its children: a file's use of a module counts for
    // the two children of their nearest common ancestor it lies under.
    let mut graphs: BTreeMap<Vec<String>, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (file, text) in &files {
        if is_test_file(file) {
            continue;
        }
        let from = module_of(file);
        for to in uses(&from, &code_only(text), &modules) {
            let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
            if common == from.len() || common == to.len() {
                continue; // an ancestor or a descendant
            }
            graphs
                .entry(from[..common].to_vec())
                .or_default()
                .entry(from[common].clone())
                .or_default()
                .insert(to[common].clone());
        }
    }
    let mut cycles = Vec::new();
    for (parent, graph) in &graphs {
        for cycle in find_cycles(graph) {
            cycles.push(format!("{}: {}", parent.join("::"), cycle.join(" -> ")));
        }
    }
    let known: BTreeSet<&str> = CYCLES.iter().copied().collect();
    let new: Vec<&String> = cycles
        .iter()
        .filter(|c| !known.contains(c.as_str()))
        .collect();
    let gone: Vec<&&str> = CYCLES
        .iter()
        .filter(|c| !cycles.iter().any(|found| found == *c))
        .collect();
    assert!(
        new.is_empty() && gone.is_empty(),
        "import cycles not listed: {new:#?}\nlisted but gone (drop them): {gone:#?}"
    );
}

/// One cycle through each strongly connected group of more than one module, written from its
/// smallest member back to it.
fn find_cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let reach = |from: &str| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.to_string()];
        while let Some(node) = stack.pop() {
            for next in graph.get(&node).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    stack.push(next.clone());
                }
            }
        }
        seen
    };
    let mut done = BTreeSet::new();
    let mut cycles = Vec::new();
    for node in graph.keys() {
        if done.contains(node) || !reach(node).contains(node) {
            continue;
        }
        // The group: nodes that reach `node` and that `node` reaches.
        let group: BTreeSet<String> = reach(node)
            .into_iter()
            .filter(|other| reach(other).contains(node))
            .collect();
        done.extend(group.iter().cloned());
        // A shortest path back to the start, by breadth-first search inside the group.
        let start = group.iter().next().cloned().unwrap_or_default();
        let mut previous: BTreeMap<String, String> = BTreeMap::new();
        let mut queue = std::collections::VecDeque::from([start.clone()]);
        let mut closing = None;
        while let Some(current) = queue.pop_front() {
            for next in graph.get(&current).into_iter().flatten() {
                if !group.contains(next) {
                    continue;
                }
                if *next == start {
                    closing = Some(current.clone());
                    break;
                }
                if !previous.contains_key(next) {
                    previous.insert(next.clone(), current.clone());
                    queue.push_back(next.clone());
                }
            }
            if closing.is_some() {
                break;
            }
        }
        let mut path = vec![start.clone()];
        let mut at = closing.unwrap_or_default();
        let mut back = Vec::new();
        while at != start && !at.is_empty() {
            back.push(at.clone());
            at = previous.get(&at).cloned().unwrap_or_default();
        }
        back.reverse();
        path.extend(back);
        path.push(start);
        cycles.push(path);
    }
    cycles
}
