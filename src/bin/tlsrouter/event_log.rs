//! Errors to the Windows Event Log (Application, source `tlsrouter`), besides the service's
//! log file: where a Windows admin looks first when a service misbehaves. A tracing layer:
//! each ERROR event, its message and fields, as one entry.

use std::ffi::c_void;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;
use windows_sys::Win32::System::EventLog::{
    DeregisterEventSource, EVENTLOG_ERROR_TYPE, RegisterEventSourceW, ReportEventW,
};

pub(crate) struct EventLog {
    source: *mut c_void,
}

// SAFETY: an event source handle may be used from any thread (ReportEvent is thread-safe).
unsafe impl Send for EventLog {}
unsafe impl Sync for EventLog {}

impl EventLog {
    /// The Application log's source `tlsrouter`; `None` when the system refuses it.
    pub(crate) fn open() -> Option<EventLog> {
        let name = wide("tlsrouter");
        // SAFETY: a NUL-terminated name; a null server is this machine.
        let source = unsafe { RegisterEventSourceW(std::ptr::null(), name.as_ptr()) };
        (!source.is_null()).then_some(EventLog { source })
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        // SAFETY: the handle RegisterEventSourceW gave.
        unsafe { DeregisterEventSource(self.source) };
    }
}

impl<S: Subscriber> Layer<S> for EventLog {
    fn on_event(&self, event: &Event<'_>, _context: Context<'_, S>) {
        if *event.metadata().level() != Level::ERROR {
            return;
        }
        let mut text = Text::default();
        event.record(&mut text);
        let line = wide(&text.0);
        let strings = [line.as_ptr()];
        // SAFETY: one NUL-terminated string, no raw data, no user SID.
        unsafe {
            ReportEventW(
                self.source,
                EVENTLOG_ERROR_TYPE,
                0,
                1,
                std::ptr::null_mut(),
                1,
                0,
                strings.as_ptr(),
                std::ptr::null(),
            )
        };
    }
}

/// An event's message, then its fields as `name=value`.
#[derive(Default)]
struct Text(String);

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.0.insert_str(0, &format!("{value:?}")),
            name => self.0.push_str(&format!(" {name}={value:?}")),
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.0.insert_str(0, value),
            name => self.0.push_str(&format!(" {name}={value}")),
        }
    }
}

fn wide(text: &str) -> Vec<u16> {
    text.encode_utf16().chain(Some(0)).collect()
}
