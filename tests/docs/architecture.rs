//! docs/ARCHITECTURE.md's module table names every module under `src/` (a folder's row
//! names each of its files), and no row names a module that is gone; every test the
//! documents name exists.

use std::collections::BTreeSet;
use std::path::Path;

use crate::root;

/// The module table's rows: the module the first cell names (`smtp/`, `outcome`), and the
/// whole row.
fn table_rows() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(root().join("docs/ARCHITECTURE.md")).expect("the doc");
    let (_, after) = text
        .split_once("| module | what it is | depends on |")
        .expect("the module table");
    after
        .lines()
        .skip(2)
        .take_while(|line| line.starts_with('|'))
        .map(|row| {
            let first = row.split('|').nth(1).unwrap_or_default().trim();
            let name = first.trim_matches('`').to_string();
            (name, row.to_string())
        })
        .collect()
}

/// The modules a row must stand for: `name` for `src/name.rs`, `name/` for a folder (and
/// `bin/tlsrouter/` for the command).
fn top_level_modules() -> BTreeSet<String> {
    let src = root().join("src");
    let mut modules = BTreeSet::new();
    for entry in std::fs::read_dir(&src).expect("src/") {
        let path = entry.expect("an entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if path.is_dir() && name == "bin" {
            for binary in std::fs::read_dir(&path).expect("src/bin/") {
                let binary = binary.expect("an entry").path();
                modules.insert(format!("bin/{}/", file_stem(&binary)));
            }
        } else if path.is_dir() {
            modules.insert(format!("{name}/"));
        } else if name.ends_with(".rs") && name != "lib.rs" {
            modules.insert(file_stem(&path));
        }
    }
    modules
}

/// Every module inside a folder, at any depth: file stems and folder names, without the
/// folders' `mod` files and the test modules.
fn modules_inside(folder: &Path) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for entry in std::fs::read_dir(folder).expect("a folder") {
        let path = entry.expect("an entry").path();
        let name = file_stem(&path);
        if path.is_dir() {
            found.extend(modules_inside(&path));
            found.insert(name);
        } else if name != "mod" && name != "tests" && path.extension().is_some_and(|e| e == "rs") {
            found.insert(name);
        }
    }
    found
}

fn file_stem(path: &Path) -> String {
    let stem = path.file_stem().and_then(|n| n.to_str());
    stem.unwrap_or_default().to_string()
}

#[test]
fn every_module_has_a_row_and_every_row_a_module() {
    let rows: BTreeSet<String> = table_rows().into_iter().map(|(name, _)| name).collect();
    let modules = top_level_modules();
    let missing: Vec<&String> = modules.difference(&rows).collect();
    assert!(missing.is_empty(), "modules without a row: {missing:?}");
    let gone: Vec<&String> = rows.difference(&modules).collect();
    assert!(
        gone.is_empty(),
        "rows for modules that do not exist: {gone:?}"
    );
}

#[test]
fn a_folders_row_names_each_of_its_files() {
    for (name, row) in table_rows() {
        let Some(folder) = name.strip_suffix('/') else {
            continue;
        };
        for module in modules_inside(&root().join("src").join(folder)) {
            assert!(
                row.contains(&format!("`{module}`")),
                "the row of {name} does not name `{module}`: {row}"
            );
        }
    }
}

/// Every test the documents name (`hardening.rs::name` for an end-to-end test,
/// `module::tests::name` for a unit test) exists: a renamed or removed test takes its
/// mention with it.
#[test]
fn every_test_the_documents_name_exists() {
    let mut sources = String::new();
    collect_sources(&root().join("src"), &mut sources);
    let mut checked = 0;
    for doc in [
        "README.md",
        "docs/SECURITY.md",
        "docs/ARCHITECTURE.md",
        "docs/OPERATIONS.md",
    ] {
        let text = std::fs::read_to_string(root().join(doc)).expect("a document");
        for quoted in text.split('`').skip(1).step_by(2) {
            let (file, name) = match quoted.split_once(".rs::") {
                Some((file, name)) if is_name(file) && is_name(name) => (Some(file), name),
                _ => match quoted.rsplit_once("::tests::") {
                    Some((_, name)) if is_name(name) => (None, name),
                    _ => continue,
                },
            };
            let defined = format!("fn {name}(");
            let found = match file {
                Some(file) => {
                    let path = root().join("tests/e2e").join(format!("{file}.rs"));
                    std::fs::read_to_string(&path).is_ok_and(|t| t.contains(&defined))
                }
                None => sources.contains(&defined),
            };
            assert!(found, "{doc} names {quoted}, which is no test");
            checked += 1;
        }
    }
    assert!(
        checked > 50,
        "only {checked} tests named: is the pattern still right?"
    );
}

fn is_name(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn collect_sources(folder: &Path, into: &mut String) {
    for entry in std::fs::read_dir(folder).expect("a folder") {
        let path = entry.expect("an entry").path();
        if path.is_dir() {
            collect_sources(&path, into);
        } else if path.extension().is_some_and(|e| e == "rs") {
            into.push_str(&std::fs::read_to_string(&path).expect("a source file"));
        }
    }
}
