//! Every agent<->manager message arrives as JSON from the network: decoding
//! never panics, and what decodes encodes back to the same message.

#![no_main]

use kvmha_proto::{
    decode, CommandRequest, CommandResponse, ErrorBody, GoodbyeMessage, JoinRequest, JoinResponse, PingMessage,
    PingReply, Versioned,
};
use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};

fn round_trip<T: DeserializeOwned + Serialize + Versioned + PartialEq + std::fmt::Debug>(bytes: &[u8]) {
    if let Ok(message) = decode::<T>(bytes) {
        let encoded = serde_json::to_vec(&message).expect("a decoded message encodes");
        let again = decode::<T>(&encoded).expect("an encoded message decodes");
        assert_eq!(again, message);
    }
}

fuzz_target!(|bytes: &[u8]| {
    round_trip::<JoinRequest>(bytes);
    round_trip::<JoinResponse>(bytes);
    round_trip::<PingMessage>(bytes);
    round_trip::<PingReply>(bytes);
    round_trip::<GoodbyeMessage>(bytes);
    round_trip::<CommandRequest>(bytes);
    round_trip::<CommandResponse>(bytes);
    round_trip::<ErrorBody>(bytes);
});
