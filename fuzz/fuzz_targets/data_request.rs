//! Memory-server request payloads: decode, and re-encode what decodes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use remora_proto::data::{decode_request, encode_request, Request};

fuzz_target!(|input: &[u8]| {
    if input.len() < 2 {
        return;
    }
    let kind = u16::from_le_bytes([input[0], input[1]]);
    if let Ok(req) = decode_request(kind, &input[2..]) {
        if let Request::Batch(b) = req {
            b.iter().for_each(drop);
        }
        let mut out = Vec::new();
        encode_request(&mut out, 1, &req);
    }
});
