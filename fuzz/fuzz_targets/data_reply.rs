//! Memory-server reply payloads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use remora_proto::data::{decode_reply, Reply};

fuzz_target!(|input: &[u8]| {
    if input.len() < 2 {
        return;
    }
    let kind = u16::from_le_bytes([input[0], input[1]]);
    if let Ok(Reply::Batch(b)) = decode_reply(kind, &input[2..]) {
        b.iter().for_each(drop);
    }
});
