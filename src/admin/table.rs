//! Text for people: aligned tables, cells safe for a terminal, times relative to now.

use serde_json::Value;

pub fn row(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|c| c.to_string()).collect()
}

/// A cell; control characters (a remote's certificate or banner can hold any) are shown
/// escaped, never sent to the terminal.
pub fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => {
            let mut shown = String::with_capacity(s.len());
            for c in s.chars() {
                if c.is_control() {
                    shown.extend(c.escape_default());
                } else {
                    shown.push(c);
                }
            }
            shown
        }
        other => other.to_string(),
    }
}

/// Aligned columns, two spaces apart.
pub fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(c, cell)| format!("{cell:<width$}", width = widths[c]))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// "in 42m", "3h ago", "now".
pub fn relative(now: u64, then: u64) -> String {
    let (delta, future) = if then >= now {
        (then - now, true)
    } else {
        (now - then, false)
    };
    if delta < 5 {
        return "now".into();
    }
    // To the nearest unit: an entry cached for 7 days a second ago expires "in 7d".
    let round = |unit: u64| (delta + unit / 2) / unit;
    let amount = if delta < 60 {
        format!("{delta}s")
    } else if round(60) < 60 {
        format!("{}m", round(60))
    } else if round(3600) < 24 {
        format!("{}h", round(3600))
    } else {
        format!("{}d", round(86_400))
    };
    with(future, amount)
}

fn with(future: bool, amount: String) -> String {
    if future {
        format!("in {amount}")
    } else {
        format!("{amount} ago")
    }
}
