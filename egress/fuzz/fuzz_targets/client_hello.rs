//! A TLS ClientHello as a guest sends it after CONNECT, to have its server
//! name checked: any bytes, split into records any way, never panic, and a
//! server name found is one the proxy can compare.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use sbx_egress::sni::read_hello;

fuzz_target!(|data: &[u8]| {
    // The first byte says how much arrived with the CONNECT head.
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let at = usize::from(split).min(rest.len());
    let (already, later) = rest.split_at(at);
    if let Ok(hello) = read_hello(&mut Cursor::new(later), already.to_vec()) {
        assert!(hello.raw.len() <= data.len());
        if let Some(name) = hello.sni {
            assert!(!name.is_empty() && name.len() <= 65535);
        }
    }
});
