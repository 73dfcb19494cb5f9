//! The documentation is true. A module added, moved or removed without its row in
//! docs/ARCHITECTURE.md, a test renamed, a log message or field changed without its
//! examples, or an example configuration that `check` would refuse fails here.

mod architecture;
mod configurations;
mod log_lines;
mod synopses;

#[path = "../support/documents.rs"]
mod documents;

pub use documents::{documents, fenced_blocks, root, shown};
