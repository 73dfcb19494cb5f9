//! Every YAML example in the documents is one that `check` accepts: a rule list (it has
//! `rules:`) with `tlsrouter check` and no warning, any other block as a configuration with
//! `tlsrouter check-config`. The files an example names under /etc/tlsrouter/ are made in a
//! temporary folder put in its place (a certificate and key where it names them); a Redis
//! server it names is replaced by a loopback address where none listens, so the only
//! warning allowed there is that Redis cannot be reached.

use std::path::Path;
use std::process::Command;

use crate::{documents, fenced_blocks, shown};

const ETC: &str = "/etc/tlsrouter/";
const NO_REDIS: &str = "redis://127.0.0.1:1";

#[test]
fn every_yaml_example_passes_check() {
    let mut checked = 0;
    for document in documents() {
        let text = std::fs::read_to_string(&document).expect("a document");
        for block in fenced_blocks(&text)
            .into_iter()
            .filter(|b| b.language == "yaml")
        {
            let place = format!("{}:{}", shown(&document), block.line);
            let folder = tempfile::tempdir().expect("a temporary folder");
            let etc = format!("{}/", folder.path().display());
            let yaml = without_redis(&block.text.replace(ETC, &etc));
            make_named_files(&yaml, &etc);
            let file = folder.path().join("example.yaml");
            std::fs::write(&file, &yaml).expect("the example written");
            let rules = yaml.lines().any(|l| l.starts_with("rules:"));
            let command = if rules { "check" } else { "check-config" };
            let out = Command::new(env!("CARGO_BIN_EXE_tlsrouter"))
                .arg(command)
                .arg(&file)
                .output()
                .expect("tlsrouter runs");
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.status.success(),
                "{place}: `tlsrouter {command}` refuses the example: {said}"
            );
            let unreachable =
                format!("warning: cache.redis: Redis at {NO_REDIS} cannot be reached");
            let warnings = said.lines().filter(|l| l.contains("warning"));
            assert!(
                warnings.clone().all(|w| w.starts_with(&unreachable)),
                "{place}: `tlsrouter {command}` warns about the example: {said}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 7, "only {checked} YAML examples found");
}

/// The shipped rule lists and configurations are accepted as they are, without a warning.
#[test]
fn every_shipped_rule_list_and_configuration_passes_check() {
    let mut shipped = vec![
        ("check-config", "examples/tlsrouter.yaml".to_string()),
        ("check-config", "packaging/tlsrouter.yaml".to_string()),
    ];
    for entry in std::fs::read_dir(crate::root().join("rules")).expect("rules/") {
        let name = entry.expect("an entry").file_name();
        shipped.push(("check", format!("rules/{}", name.to_string_lossy())));
    }
    assert!(shipped.len() >= 5, "{shipped:?}");
    let folder = tempfile::tempdir().expect("a temporary folder");
    for (command, file) in shipped {
        // The package makes the admin group; this machine need not have it.
        let text = std::fs::read_to_string(crate::root().join(&file)).expect("a shipped file");
        let copy = folder.path().join(file.replace('/', "-"));
        std::fs::write(&copy, text.replace("group: tlsrouter-admin", "group: root"))
            .expect("a copy");
        let out = Command::new(env!("CARGO_BIN_EXE_tlsrouter"))
            .arg(command)
            .arg(&copy)
            .output()
            .expect("tlsrouter runs");
        let said = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{file}: {said}");
        assert!(!said.contains("warning"), "{file}: {said}");
    }
}

/// The example with the Redis server it names (`url: redis://...`) replaced by [`NO_REDIS`].
fn without_redis(yaml: &str) -> String {
    let lines = yaml
        .lines()
        .map(|line| match line.split_once("url: redis") {
            Some((key, rest)) => {
                let comment = rest.find(" #").map_or("", |at| &rest[at..]);
                format!("{key}url: {NO_REDIS}{comment}")
            }
            None => line.to_string(),
        });
    lines.collect::<Vec<_>>().join("\n") + "\n"
}

/// Makes every file the example names in `etc`: a certificate and its key for `.crt` and
/// `.key`, a secret for anything else.
fn make_named_files(yaml: &str, etc: &str) {
    let mut names: Vec<&str> = Vec::new();
    for (at, _) in yaml.match_indices(etc) {
        let rest = &yaml[at + etc.len()..];
        let end = rest
            .find(|c: char| c.is_whitespace() || "\"',}]".contains(c))
            .unwrap_or(rest.len());
        names.push(&rest[..end]);
    }
    let key = rcgen::KeyPair::generate().expect("a key");
    let params = rcgen::CertificateParams::new(vec!["relay.example".to_string()]).expect("params");
    let certificate = params.self_signed(&key).expect("a certificate");
    for name in names {
        let path = Path::new(etc).join(name);
        let content = match path.extension().and_then(|e| e.to_str()) {
            Some("crt") => certificate.pem(),
            Some("key") => key.serialize_pem(),
            // As long as an admin token must be.
            _ => "secret-0123456789abcdef0123456789\n".to_string(),
        };
        std::fs::write(&path, content).expect("a named file");
    }
}
