//! Arbitrary bytes, fed in arbitrary chunks, through the frame decoder and
//! then every frame through the matching payload decoder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use remora_proto::frame::FrameDecoder;
use remora_proto::{ctl, data};

fuzz_target!(|input: &[u8]| {
    let Some((&chunk, bytes)) = input.split_first() else { return };
    let chunk = usize::from(chunk).max(1);
    let mut d = FrameDecoder::new(1 << 16);
    for piece in bytes.chunks(chunk) {
        d.spare(piece.len())[..piece.len()].copy_from_slice(piece);
        d.filled(piece.len());
        loop {
            match d.peek() {
                Ok(Some(f)) => {
                    if let Ok(data::Request::Batch(b)) = data::decode_request(f.kind, f.payload) {
                        b.iter().for_each(drop);
                    }
                    if let Ok(data::Reply::Batch(b)) = data::decode_reply(f.kind, f.payload) {
                        b.iter().for_each(drop);
                    }
                    let _ = ctl::decode_request(f.payload);
                    d.consume();
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
