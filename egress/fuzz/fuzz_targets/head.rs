//! What a guest sends the egress proxy first: a request head, read from a
//! stream in pieces and parsed. Reading never panics or runs past its
//! bound, and a head that parses says the same after encoding.
#![no_main]

use std::io::Cursor;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use sbx_egress::head::{self, Head};

fuzz_target!(|data: &[u8]| {
    let max = 1024;
    let mut stream = Cursor::new(data);
    if let Ok(raw) = head::read(&mut stream, |_, _| Ok(()), max, Duration::from_secs(5)) {
        assert!(raw.bytes.len() <= max + 4, "a head past its bound");
        assert!(data.starts_with(&raw.bytes));
    }
    let _ = Head::parse_response(data);
    if let Ok(h) = Head::parse_request(data) {
        let start = format!("{} {} HTTP/1.{}", h.first, h.second, h.third);
        let again = Head::parse_request(&h.encode(&start)).expect("an encoded head parses");
        assert_eq!((&again.first, &again.second), (&h.first, &h.second));
        assert_eq!(again.headers, h.headers);
    }
});
