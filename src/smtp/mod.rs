//! The SMTP wire protocol, shared by both sides of the proxy: command and reply syntax,
//! line reading with limits, EHLO capabilities, the DATA body filter and the header block.

pub mod command;
pub mod data;
pub mod ehlo;
pub mod header;
pub mod line;
pub mod peek;
pub mod reply;

pub use command::{
    Command, CommandError, MailParams, Mailbox, MissingExtension, RcptParams, parse_command,
};
pub use ehlo::Capabilities;
pub use reply::Reply;
