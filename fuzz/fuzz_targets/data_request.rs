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
        match req {
            Request::Batch(b) => b.iter().for_each(drop),
            Request::Offload { op, .. } => {
                let _ = (op.validate(), op.extent(), op.alignment(), op.reply_bound());
            }
            _ => {}
        }
        let mut out = Vec::new();
        encode_request(&mut out, 1, &req);
        // What decodes re-encodes to the same payload.
        assert_eq!(&out[14..], &input[2..]);
    }
});
