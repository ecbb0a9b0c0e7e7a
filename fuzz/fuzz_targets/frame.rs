//! The frame decoder, as a target reads what a peer sends: the length-prefixed payload, the
//! handshake frames (hello, token proof) and the `(id, Request)` frames after them. Any input
//! must give a value or an error: no panic, no hang, no allocation a length field alone asks for.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mirrorfs::protocol::{self, ClientAuth, ClientHello, Request};

fuzz_target!(|data: &[u8]| {
    let _ = protocol::read_handshake::<ClientHello>(&mut &data[..]);
    let _ = protocol::read_handshake::<ClientAuth>(&mut &data[..]);
    let _ = protocol::decode::<(u64, Request)>(data);
    let mut r = data;
    while let Ok(payload) = protocol::read_payload(&mut r) {
        let _ = protocol::decode::<(u64, Request)>(&payload);
        let _ = protocol::peek_id(&payload);
    }
});
