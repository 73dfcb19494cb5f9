//! `policy::tlsrpt::parse_tlsrpt_records` on any TXT answer a domain can publish (one record
//! per line): never panics, and every address it gives, written out, reads back as itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tlsrouter::policy::tlsrpt::{parse_rua, parse_tlsrpt_records};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let records: Vec<String> = text.split('\n').map(String::from).collect();
    if let Ok(addresses) = parse_tlsrpt_records(&records) {
        assert!(!addresses.is_empty());
        for rua in addresses {
            let uri = rua.to_string();
            assert_eq!(parse_rua(&uri).as_ref(), Some(&rua), "{uri:?}");
        }
    }
    for field in text.split([',', ';', '\n']) {
        let _ = parse_rua(field.trim());
    }
});
