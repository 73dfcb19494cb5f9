//! The documents an admin reads (the README, docs/, the examples' READMEs) and their
//! fenced blocks, for the tests that hold them to what the binary does.

use std::path::{Path, PathBuf};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The documents an admin reads: the README, docs/ and the examples' READMEs.
pub fn documents() -> Vec<PathBuf> {
    let mut documents = vec![root().join("README.md")];
    for folder in ["docs", "examples"] {
        let mut found = Vec::new();
        collect_markdown(&root().join(folder), &mut found);
        found.sort();
        documents.extend(found);
    }
    documents
}

fn collect_markdown(folder: &Path, into: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(folder).expect("a folder") {
        let path = entry.expect("an entry").path();
        if path.is_dir() {
            collect_markdown(&path, into);
        } else if path.extension().is_some_and(|e| e == "md") {
            into.push(path);
        }
    }
}

/// A fenced block of a document: its language (`yaml`, `sh`, or empty), the line of the
/// document its first line is on, and its text.
pub struct Block {
    pub language: String,
    pub line: usize,
    pub text: String,
}

pub fn fenced_blocks(document: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut open: Option<Block> = None;
    for (i, line) in document.lines().enumerate() {
        let fence = line.trim_start().strip_prefix("```");
        match (fence, open.take()) {
            (Some(language), None) => {
                open = Some(Block {
                    language: language.trim().to_string(),
                    line: i + 2,
                    text: String::new(),
                })
            }
            (Some(_), Some(block)) => blocks.push(block),
            (None, Some(mut block)) => {
                block.text.push_str(line);
                block.text.push('\n');
                open = Some(block);
            }
            (None, None) => {}
        }
    }
    blocks
}

/// A document's path as the messages name it: from the project's root.
pub fn shown(path: &Path) -> String {
    let relative = path.strip_prefix(root()).unwrap_or(path);
    relative.display().to_string()
}
